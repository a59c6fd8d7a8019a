"""distill reads a GGUF checkpoint of every coverage-matrix family transformers reads from GGUF.

Each row writes the family's tiny random model (`tests/families.py`) as an F32 GGUF file laid out
as llama.cpp's converter lays it out (`tests/gguf_files.py`), converts it with
`distill.models.gguf.gguf_to_hf`, reloads the cached directory with the family's plain Auto
class and compares logits with the original model's: the tensor names, llama.cpp's layout
conventions (Q/K permutation, Gemma's `w + 1` norms, GPT-2's transposes) and the config rebuilt
from the metadata must all be right for them to match. Where transformers' reader cannot take a
config field from the file, the tiny model uses the value the reader assumes (`GGUF_FAMILIES`).
The tokenizer must come along too.

Rows (transformers 5.23 and 5.25, gguf 0.19): llama, mistral (llama.cpp writes it as "llama",
so it comes back a LlamaForCausalLM: the same function), qwen2, qwen3, phi3, gpt2, gemma2,
gemma3_text, bloom (its per-head QKV stacked as llama.cpp stores it), stablelm, starcoder2.

t5: distill refuses encoder–decoder GGUF files with a clear error, because transformers 5.25
reads them wrongly: it sets `is_gated_act` on the T5Config it rebuilds, which the config
recomputes from `feed_forward_proj` (left at "relu"), and the config comes back with
`scale_decoder_outputs` on (original, tied T5's logit scaling) even for a file with an untied
head. A flan-T5 file (gated GELU, untied head) so loads as gated ReLU with scaled logits, and a
T5 v1.0 file (plain ReLU) as a gated FFN whose `wi_0` is left at random init. A strict
expected failure reads the flan-T5 file with transformers directly: it starts passing, and so
fails, once transformers reads T5 right, which is when the refusal should go.

No row for the families in `NO_GGUF_READER`: transformers 5.25 has no GGUF reader for their
architecture (none in `GGUF_CONFIG_MAPPING`), whatever llama.cpp writes for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from distill.errors import DistillError
from distill.models.gguf import gguf_to_hf
from families import FAMILIES, logits
from gguf_files import GGUF_FAMILIES, build_for_gguf, write_gguf

# Families with no row, and why.
NO_GGUF_READER = {
    "gemma": 'llama.cpp writes "gemma"; transformers: "architecture gemma is not supported yet"',
    "olmo2": 'llama.cpp writes "olmo2", which transformers does not read',
    "gpt_neox": 'llama.cpp writes "gptneox", which transformers does not read',
    "opt": "neither llama.cpp nor transformers has a GGUF architecture for OPT",
    "mixtral": 'llama.cpp writes "llama" with stacked expert tensors; transformers\' llama '
               "reader builds a dense Llama, with no experts to put them in",
    "bert": 'llama.cpp writes "bert" (an embedding model), which transformers does not read',
    "roberta": 'llama.cpp writes "bert", which transformers does not read',
    "xlm-roberta": 'llama.cpp writes "bert", which transformers does not read',
    "electra": "no GGUF architecture in transformers",
    "distilbert": "no GGUF architecture in transformers",
    "deberta-v2": "no GGUF architecture in transformers",
    "modernbert": 'llama.cpp writes "modern-bert", which transformers does not read',
    "bart": "neither llama.cpp nor transformers has a GGUF architecture for BART",
    "gptj": 'llama.cpp writes "gptj", which transformers does not read',
}
T5_MISREAD = ("transformers (5.23 to 5.25 at least) rebuilds a T5 GGUF as a gated-ReLU T5 "
              "with scaled decoder outputs, whatever the file holds")


DECODERS = [name for name in GGUF_FAMILIES if name != "t5"]


def test_every_family_has_a_row_or_a_reason() -> None:
    """A family added to the coverage matrix must be classified here too."""
    assert set(GGUF_FAMILIES) | set(NO_GGUF_READER) == set(FAMILIES)
    assert not set(GGUF_FAMILIES) & set(NO_GGUF_READER)


@pytest.mark.parametrize("name", DECODERS)
def test_gguf_of_each_family_converts_to_the_same_model(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    original = build_for_gguf(name)
    path = tmp_path / f"tiny-{name}.F32.gguf"
    write_gguf(original, path, GGUF_FAMILIES[name].arch)
    out = gguf_to_hf(path)
    auto = getattr(transformers, FAMILIES[name].auto)
    model = auto.from_pretrained(out).eval()  # a plain HF directory: no gguf_file
    torch.testing.assert_close(logits(model, name), logits(original, name))
    # The file's tokenizer came along and speaks the model's vocabulary. (The tokenizer class
    # may add its own defaults past it, such as Gemma's `<mask>`, which a real file holds and
    # this tiny vocabulary does not: so no check on its length.)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = original.config
    assert tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.pad_token_id == config.pad_token_id
    ids = tokenizer("the cat at the gate", add_special_tokens=False)["input_ids"]
    assert max(ids) < config.vocab_size
    assert tokenizer.decode(ids) == "the cat at the gate"


def test_an_encoder_decoder_gguf_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-t5.F32.gguf"
    write_gguf(build_for_gguf("t5"), path, GGUF_FAMILIES["t5"].arch)
    with pytest.raises(DistillError, match=r"an encoder–decoder GGUF \(t5\); transformers "
                                           r".* rebuilds these with the wrong feed-forward"):
        gguf_to_hf(path)
    assert not list((tmp_path / "cache" / "gguf").glob("tiny-t5*"))  # nothing cached


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=T5_MISREAD)
def test_transformers_reads_a_flan_t5_gguf_right(tmp_path: Path) -> None:
    """The canary: when this passes (and so fails, strictly), lift the refusal above."""
    original = build_for_gguf("t5")
    path = tmp_path / "tiny-t5.F32.gguf"
    write_gguf(original, path, GGUF_FAMILIES["t5"].arch)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(model, "t5"), logits(original, "t5"))


def test_a_file_that_leaves_weights_unset_is_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without the final norm: transformers would build the model with that norm at
    its init and only log it; distill refuses the file and caches nothing."""
    import gguf

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    add = gguf.GGUFWriter.add_tensor

    def all_but_the_final_norm(self, name, *args, **kwargs):
        if name != "output_norm.weight":
            add(self, name, *args, **kwargs)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", all_but_the_final_norm)
    path = tmp_path / "no-norm.gguf"
    write_gguf(build_for_gguf("llama"), path, "llama")
    with pytest.raises(DistillError, match=r"the file has no tensors for 1 weights of "
                                           r"LlamaForCausalLM \(model\.norm\.weight"):
        gguf_to_hf(path)
    assert not list((tmp_path / "cache" / "gguf").glob("no-norm*"))
