"""Shared fixtures: a tiny random BERT with its own tokenizer, and a tiny separable dataset.

Nothing here downloads anything: the vocabulary is written to disk and the model is built
from a config with random weights.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and when another process shares the two
# cores, OpenMP threads spin-waiting on each other make them ~100x slower. The integration
# tests (real models) raise the count again for themselves.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = "good great fine superb lovely brilliant charming moving funny smart".split()
NEGATIVE = "bad awful dull boring weak messy tedious clumsy flat lame".split()
NEUTRAL = "the film movie story plot actor scene script is was a an and of it".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze the objects of the modules imported so far, as the CLI does at set-up
    (distill/cli.py): the runs of a test process collect garbage at every stage end
    (accelerate's free_memory), and each collection would walk every module object the test
    files imported."""
    import gc

    gc.freeze()


def free_port() -> int:
    """A TCP port nobody listens on (for a test's own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_bert(path: Path, layers: int = 4, hidden: int = 32, heads: int = 4,
                    seed: int = 0) -> Path:
    """A random BERT encoder (no head) + WordPiece tokenizer saved in HF format."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(words),
                        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_tiny_teacher(path: Path, base: Path, labels: tuple[str, ...] = ("neg", "pos"),
                       seed: int = 0) -> Path:
    """`base` with a classification head for `labels` in its weights, as a finetune stage
    saves it (the head is random but stored), so distill stages accept it as a teacher."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    model = BertForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=id2label,
        label2id={v: k for k, v in id2label.items()})
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def write_tiny_dataset(path: Path, n: int = 240, seed: int = 0) -> Path:
    """A csv of short 'reviews' whose label follows the majority of sentiment words."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        main, other = (POSITIVE, NEGATIVE) if label == "pos" else (NEGATIVE, POSITIVE)
        words = rng.sample(NEUTRAL, 4) + rng.sample(main, 2) + rng.sample(other, 1)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_tiny_topics(path: Path, n: int = 180, seed: int = 1) -> Path:
    """A csv with a *different* 3-label task: which word group a text is about (a new head)."""
    rng = random.Random(seed)
    groups = {"praise": POSITIVE, "complaint": NEGATIVE,
              "craft": "film movie story plot actor scene script".split()}
    rows = ["text,label"]
    for i in range(n):
        label = list(groups)[i % 3]
        words = rng.sample(groups[label], 3) + rng.sample("is was a an and of it".split(), 3)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_few_words(source: Path, path: Path, reviews: int, repeats: int) -> Path:
    """A csv of the first `reviews` rows of the csv `source`, repeated `repeats` times: data
    that uses a part of the tiny vocabulary, so that trimming the vocabulary removes tokens."""
    header, *rows = source.read_text().splitlines()
    path.write_text("\n".join([header, *rows[:reviews] * repeats]) + "\n")
    return path


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest):
    """One thread for tests on tiny models; all cores for `integration` tests."""
    import torch

    before = torch.get_num_threads()
    integration = request.node.get_closest_marker("integration") is not None
    wanted = (os.cpu_count() or 1) if integration else 1
    torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_teacher(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"), tiny_bert)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "reviews.csv")


@pytest.fixture(scope="session")
def tiny_topics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_topics(tmp_path_factory.mktemp("topics") / "topics.csv")


def classifier(name: str, label_names: list[str], **options: object):
    """A sequence classifier with a head for `label_names`, as the recipes load it
    (`SequenceClassification.load_model`): (model, whether its head was trained for them)."""
    from types import SimpleNamespace

    from distill.tasks import get_task

    return get_task("sequence-classification").load_model(
        name, SimpleNamespace(label_names=list(label_names)), **options)


def tiny_recipe(model: Path, data: Path, **overrides: object) -> dict:
    """A complete recipe for the tiny model and data: finetune -> distill -> evaluate.

    Its training stages are pinned to fp32: `bf16: auto` times the tiny model, whose bf16 step
    is ~0.75x as fast as fp32's here, and a busy machine could tip it; tests that compare two
    runs bit for bit need both in one precision (tests/test_precision.py tests `auto`)."""
    recipe = {
        "name": "tiny",
        "seed": 0,
        "teacher": {"model": str(model)},
        "data": {"dataset": str(data), "max_length": 16},
        "stages": [
            {"kind": "finetune", "epochs": 10, "batch_size": 16, "learning_rate": 2e-3,
             "log_every": 2, "bf16": False},
            {"kind": "distill", "epochs": 6, "batch_size": 16, "learning_rate": 1e-3,
             "log_every": 2, "bf16": False, "student": {"layers": [0, 2]},
             "loss": {"alpha": 0.5, "temperature": 2.0, "hidden_mse": 1.0}},
            {"kind": "evaluate", "latency_runs": 2},
        ],
    }
    recipe.update(overrides)
    return recipe
