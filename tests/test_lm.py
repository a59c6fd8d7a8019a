"""Language-model plumbing: GGUF -> cached HF directory, Shakespeare text and blocks, perplexity.

The GGUF tests write a tiny random Llama (2 layers, hidden 32, byte-level BPE vocabulary of 263
tokens) to a real `.gguf` file with the `gguf` package's writer, laid out as llama.cpp's
converter lays it out (Q/K rows permuted for its rotary convention), so the conversion is tested
end to end in well under a second. The packaged SmolLM2 file is touched only by the
`integration` test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

import distill.models.gguf as gguf_mod
from distill.errors import DistillError
from distill.models.gguf import cache_dir_for, gguf_to_hf
from distill.data.text import (lm_batches, load_lm_text, sample_blocks, sequence_prefix,
                               strip_markdown, tokenize_blocks)
from distill.models.loading import resolve_model_path
from distill.tasks.perplexity import perplexity


# --- a tiny GGUF --------------------------------------------------------------------------------

HEADS, KV_HEADS = 4, 2
_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py `LlamaModel.permute`); transformers
    undoes it on load."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """A random tied-embedding Llama written as an F32 GGUF with a byte-level BPE tokenizer."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    tokens = special + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "Ġa"]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(32 // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(special) + [1] * (len(tokens) - len(special)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(2):
        for hf_name, gguf_name in _GGUF_NAMES.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = _llama_cpp_permute(w, HEADS)
            elif gguf_name == "attn_k":
                w = _llama_cpp_permute(w, KV_HEADS)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture()
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, LlamaForCausalLM]:
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


def test_gguf_converts_to_a_plain_hf_directory_with_the_same_model(tiny_gguf) -> None:
    path, original = tiny_gguf
    out = Path(resolve_model_path(str(path)))
    assert out == cache_dir_for(path)
    assert out.parent.parent == Path(os.environ["DISTILL_CACHE"])
    assert out.name.startswith("tiny-llama.F32-")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    assert (out / "model.safetensors").is_file()
    # Reloads without any GGUF support, same function as the model that was written.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    tokenizer = AutoTokenizer.from_pretrained(out)
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the cat at the gate"
    assert tokenizer(text)["input_ids"] == from_gguf(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>"


def test_gguf_cache_is_reused_and_keyed_by_the_file(tiny_gguf, monkeypatch) -> None:
    path, _ = tiny_gguf
    first = gguf_to_hf(path)

    def no_conversion(*_: object) -> None:
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(gguf_mod, "_convert", no_conversion)
    assert gguf_to_hf(path) == first
    # A replaced (here: touched) file is a new cache entry, never the stale one.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_dir_for(path) != first
    with pytest.raises(AssertionError, match="converted again"):
        gguf_to_hf(path)


def test_interrupted_conversion_leaves_no_cache_entry(tiny_gguf, monkeypatch) -> None:
    path, _ = tiny_gguf
    real_convert = gguf_mod._convert

    def dies_half_way(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod, "_convert", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf(path)
    target = cache_dir_for(path)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temp folder is gone too
    # A SIGKILL skips the clean-up: its temp folder is removed by a later conversion once
    # it is an hour old (a younger one may belong to a conversion still running).
    killed, running = (target.parent / f".tmp-{target.name}-{s}" for s in ("old", "new"))
    for folder in (killed, running):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    os.utime(killed, (0, 0))
    # A folder without the completion marker (e.g. a copy interrupted by hand) is not trusted:
    # it is converted again and replaced.
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_mod, "_convert", real_convert)
    assert gguf_to_hf(path) == target
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name,
                                                                      running.name])


def test_model_path_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DistillError, match="model path not found"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(DistillError, match="model path not found"):
        resolve_model_path("missing.gguf")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DistillError, match="nor a .gguf file"):
        resolve_model_path(str(notes))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(DistillError, match="could not read this GGUF file"):
        resolve_model_path(str(junk))
    assert not cache_dir_for(junk).exists()
    with pytest.raises(DistillError, match="builtin:minilm-l6, builtin:smollm2-135m"):
        resolve_model_path("builtin:gpt5")
    assert resolve_model_path("org/model") == "org/model"  # hub ids pass through


@pytest.mark.integration
def test_builtin_smollm2_resolves_to_a_cached_hf_directory() -> None:
    """~25 s the first time on a machine (conversion), well under a second afterwards."""
    out = Path(resolve_model_path("builtin:smollm2-135m"))
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == \
        ("llama", 30, 576)
    assert "quantization_config" not in config
    assert resolve_model_path("builtin:smollm2-135m") == str(out)


# --- text and blocks ----------------------------------------------------------------------------

def test_strip_markdown() -> None:
    md = ("# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \n"
          "When shall we three meet again  \nIn thunder?\n\n\n\n*Exeunt*\n__\\[Aside]_  \n")
    assert strip_markdown(md) == ("Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\n"
                                  "First Witch\nWhen shall we three meet again\nIn thunder?\n\n"
                                  "Exeunt\n[Aside]\n")


def test_shakespeare_split_is_by_whole_plays_and_fixed() -> None:
    text = load_lm_text("builtin:shakespeare")
    sizes = {s: len(text.split(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 32, "validation": 3, "test": 3}
    names = text.names
    assert len(set(names["train"]) | set(names["validation"]) | set(names["test"])) == 38
    assert all(names[s] == sorted(names[s]) for s in names)
    # Pinned: the documented split of split_seed=0 (benchmarks compare across runs).
    assert names["test"] == ["comedies/the-comedy-of-errors.md",
                             "problems/measure-for-measure.md",
                             "problems/the-merchant-of-venice.md"]
    assert text.test[0].startswith("The Comedy of Errors\n\nACT I\n")
    assert not any(c in "".join(text.test) for c in "*_#\\")
    other = load_lm_text("builtin:shakespeare", split_seed=1)
    assert other.names["test"] != names["test"]


def test_folder_source_and_errors(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n")
    text = load_lm_text(str(tmp_path))
    assert (len(text.train), len(text.validation), len(text.test)) == (8, 1, 1)
    (tmp_path / "doc9.txt").unlink()
    with pytest.raises(DistillError, match="too few"):
        load_lm_text(str(tmp_path))
    with pytest.raises(DistillError, match="allowed: builtin:shakespeare"):
        load_lm_text("builtin:poems")
    with pytest.raises(DistillError, match="not found"):
        load_lm_text(str(tmp_path / "nowhere"))
    with pytest.raises(DistillError, match="split 'dev'"):
        text.split("dev")


def test_a_list_of_sources_is_a_mixture_split_per_source(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(f"note {i}\n")
    (tmp_path / "rows.csv").write_text("text,other\n" + "".join(f"row {i},x\n"
                                                                 for i in range(30)))
    alone = [load_lm_text(str(folder)), load_lm_text(str(tmp_path / "rows.csv"))]
    mixed = load_lm_text([str(folder), str(tmp_path / "rows.csv")])
    for split in ("train", "validation", "test"):
        # Each source keeps its own held-out documents, in the listed order.
        assert mixed.split(split) == alone[0].split(split) + alone[1].split(split)
        assert mixed.names[split] == ([f"{folder}: {n}" for n in alone[0].names[split]]
                                      + [f"{tmp_path / 'rows.csv'}: {n}"
                                         for n in alone[1].names[split]])
    assert mixed.sizes() == {"train": 40, "validation": 5, "test": 5}
    assert alone[1].test[0].startswith("row ")
    with pytest.raises(DistillError, match="column 'body' not found"):
        load_lm_text(str(tmp_path / "rows.csv"), text_column="body")
    with pytest.raises(DistillError, match="lists a source twice"):
        load_lm_text([str(folder), str(folder)])
    with pytest.raises(DistillError, match="an empty list"):
        load_lm_text([])


def test_mixture_weights_set_each_sources_share_of_blocks(tmp_path: Path) -> None:
    from distill.data.text import mixture_blocks

    tok = word_tokenizer()
    big, small = tmp_path / "big", tmp_path / "small"
    for folder, n, word in ((big, 40, "a"), (small, 20, "b")):
        folder.mkdir()
        for i in range(n):
            (folder / f"{i:02d}.txt").write_text(f"{word} " * 15)
    mixed = load_lm_text([str(big), str(small)])
    blocks = mixture_blocks(mixed.parts, "train", tok, 4, [1, 3], cap=20)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    # 5 blocks of the first source, then 15 of the second (each block is one source's text).
    assert blocks.shape == (20, 4)
    assert (blocks[:5] != b).all() and (blocks[5:] != a).all()
    # No cap: as many as the scarcer source allows at these ratios (1:1 here).
    whole = mixture_blocks(mixed.parts, "train", tok, 4, [1, 1], cap=None)
    rows_a, rows_b = int((whole == a).any(1).sum()), int((whole == b).any(1).sum())
    assert rows_a == rows_b == 64 and len(whole) == 128  # the smaller source's 64 blocks
    with pytest.raises(DistillError, match="data.weights: .*small has 64 train blocks, fewer "
                                           "than its share of 90"):
        mixture_blocks(mixed.parts, "train", tok, 4, [1, 9], cap=100)


def test_rotten_tomatoes_snippets_are_text_documents() -> None:
    text = load_lm_text("builtin:rotten_tomatoes")
    assert sum(text.sizes().values()) == 12_808
    assert all(doc.strip() for doc in text.test)


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate("<unk> </s> a b c d e f".split())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_tokenize_blocks_and_batches() -> None:
    tok = word_tokenizer()
    blocks = tokenize_blocks(["a b c", "d e", "f a b c d"], tok, block_size=4)
    # stream: a b c </s> d e </s> f a b c d </s>  (13 tokens) -> 3 full blocks, tail dropped
    assert blocks.dtype == torch.long and blocks.shape == (3, 4)
    assert blocks.flatten().tolist() == [2, 3, 4, 1, 5, 6, 1, 7, 2, 3, 4, 5]
    with pytest.raises(DistillError, match="fewer than one block"):
        tokenize_blocks(["a b"], tok, block_size=8)
    with pytest.raises(DistillError, match="at least 2 tokens"):
        tokenize_blocks(["a b"], tok, block_size=1)


def test_blocks_start_with_the_tokens_the_tokenizer_puts_in_front() -> None:
    """A tokenizer that opens every sequence with BOS (Gemma, Llama 2): every block opens with
    it, as every sequence the model was trained on did; the text fills the rest."""
    from tokenizers import processors

    tok = word_tokenizer()
    assert sequence_prefix(tok) == []
    bos = tok.convert_tokens_to_ids("</s>")  # the tiny vocabulary's one special token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", bos)])
    assert tok("a b")["input_ids"] == [bos, 2, 3] and sequence_prefix(tok) == [bos]
    blocks = tokenize_blocks(["a b c", "d e", "f a b c d"], tok, block_size=4)
    # stream: a b c </s> d e </s> f a b c d </s>; each block: BOS + 3 stream tokens
    assert blocks.tolist() == [[bos, 2, 3, 4], [bos, 1, 5, 6], [bos, 1, 7, 2], [bos, 3, 4, 5]]
    with pytest.raises(DistillError, match="at least 3 tokens"):
        tokenize_blocks(["a b"], tok, block_size=2)

    many = torch.arange(40).view(10, 4)
    subset = sample_blocks(many, 4, seed=0)
    assert subset.shape == (4, 4) and torch.equal(subset, sample_blocks(many, 4, seed=0))
    rows = subset[:, 0].tolist()
    assert rows == sorted(rows) and len(set(rows)) == 4
    assert sample_blocks(many, None) is many and sample_blocks(many, 99) is many

    batches = list(lm_batches(many, batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), many)
    assert all(torch.equal(b["labels"], b["input_ids"]) and bool(b["attention_mask"].all())
               for b in batches)
    shuffled = torch.cat([b["input_ids"] for b in lm_batches(many, 3, shuffle=True, seed=1)])
    again = torch.cat([b["input_ids"] for b in lm_batches(many, 3, shuffle=True, seed=1)])
    assert torch.equal(shuffled, again) and not torch.equal(shuffled, many)
    assert sorted(shuffled[:, 0].tolist()) == many[:, 0].tolist()


# --- perplexity ---------------------------------------------------------------------------------

def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, max_position_embeddings=64))


def test_perplexity_matches_the_models_own_loss() -> None:
    model = tiny_lm().eval()
    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert perplexity(model, [{"input_ids": ids}]) == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_is_token_weighted_not_batch_averaged() -> None:
    model = tiny_lm().eval()
    ids = torch.randint(0, 50, (4, 10))
    mask = torch.ones_like(ids)
    mask[1:, 3:] = 0  # rows 1-3 predict 2 tokens each, row 0 predicts 9
    batches = [{"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]} for i in range(4)]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].bool()
    expected = math.exp(float(-logp[keep].mean()))
    # batch-averaging the four per-row means would weight row 0's 9 tokens like 2
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask}]) == \
        pytest.approx(expected, rel=1e-5)


class _Uniform(torch.nn.Module):
    """Zero logits over a vocabulary of 7: perplexity exactly 7."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, **_: object):
        from types import SimpleNamespace
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 7) * self.w)


def test_perplexity_edge_cases() -> None:
    uniform = _Uniform().train()
    ids = torch.randint(0, 7, (2, 5))
    assert perplexity(uniform, [{"input_ids": ids}]) == pytest.approx(7.0)
    assert uniform.training  # mode restored
    with pytest.raises(ValueError, match="no tokens to predict"):
        perplexity(uniform, [])


def test_training_blocks_come_in_a_fixed_shuffled_order(tmp_path: Path) -> None:
    """The first blocks (a shrink's calibration batch) come from across the split, not from
    its first document; the order is fixed by the split seed."""
    from distill.config.recipe import DataConfig
    from distill.tasks import get_task

    words = "a b c d e f".split()
    for i in range(30):
        (tmp_path / f"{i:02d}.txt").write_text(f"{words[i % 6]} " * 40)
    task, tok = get_task("causal-lm"), word_tokenizer()
    cfg = DataConfig(dataset=str(tmp_path), max_length=8)
    data = task.load_data(cfg)
    items = task.tokenize(data, "train", tok, cfg)
    first = {int(items.blocks[i, 0]) for i in range(8)}
    assert len(first) >= 3  # in document order all 8 would be the first document's word
    again = task.tokenize(data, "train", tok, cfg)
    assert torch.equal(items.blocks, again.blocks)
    ordered = tokenize_blocks(data.train, tok, block_size=8)
    assert sorted(items.blocks.tolist()) == sorted(ordered.tolist())  # the same blocks
