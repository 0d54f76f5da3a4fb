"""docs/iapt.md, section 6: adapter_config.json and adapter_model.safetensors, every bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_iapt.adapter import AdapterError, load_adapter
from vllm_iapt.config import AdapterConfig

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture
def good(adapter_factory, tmp_path):
    src = adapter_factory("good-rational", num_soft_tokens=3, bottleneck_dim=8, layers=[0, 1])
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / CONFIG).read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / CONFIG).write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    t = load_file(path / WEIGHTS)
    fn(t)
    save_file(t, path / WEIGHTS)


def expect(path, match, **kw):
    with pytest.raises(AdapterError, match=match) as e:
        load_adapter(path, **kw)
    assert path.name in str(e.value)  # every error names the adapter


def test_round_trip(good):
    a = load_adapter(good, hidden_size=128, num_hidden_layers=2)
    assert a.config.num_soft_tokens == 3 and a.config.generator_layers == (0, 1)
    assert set(a.tensors) == set(a.config.tensor_shapes())
    w = a.layer_weights(1)
    assert w.query.shape == (3, 8) and w.numerator.shape == (6,) and w.denominator.shape == (4,)
    assert len(a.content_hash) == 64
    assert a.config.num_parameters() == 2 * (2 * 128 * 8 + 8 + 128 + 3 * 8 + 10)


def test_content_hash_follows_weights_not_name(good, tmp_path):
    a = load_adapter(good)
    other = tmp_path / "renamed"
    shutil.copytree(good, other)
    assert load_adapter(other).content_hash == a.content_hash
    edit_tensors(other, lambda t: t.__setitem__("layers.0.up.bias", t["layers.0.up.bias"] + 1))
    assert load_adapter(other).content_hash != a.content_hash


def test_missing_directory(tmp_path):
    expect(tmp_path / "nope", "does not exist")


def test_missing_config(good):
    (good / CONFIG).unlink()
    expect(good, "missing adapter_config.json")


def test_missing_weights(good):
    (good / WEIGHTS).unlink()
    expect(good, "missing weights file")


def test_unreadable_json(good):
    (good / CONFIG).write_text("{not json")
    expect(good, "not readable JSON")


def test_json_not_object(good):
    (good / CONFIG).write_text("[1, 2]")
    expect(good, "JSON object")


def test_wrong_peft_type(good):
    edit_config(good, peft_type="LORA")
    expect(good, "peft_type is 'LORA'")


def test_unsupported_format_version(good):
    edit_config(good, format_version=2)
    expect(good, "unsupported format_version 2")


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "bottleneck_dim", "activation", "torch_dtype"])
def test_missing_required_key(good, key):
    edit_config(good, **{key: ...})
    expect(good, f"{key}: Field required")


@pytest.mark.parametrize("changes,match", [
    ({"lora_alpha": 8}, "lora_alpha: Extra inputs are not permitted"),
    ({"num_soft_tokens": 0}, "num_soft_tokens"),
    ({"num_soft_tokens": "4"}, "num_soft_tokens"),
    ({"activation": "tanh"}, "activation"),
    ({"torch_dtype": "float64"}, "torch_dtype"),
    ({"layers": [1]}, "must contain 0"),
    ({"layers": [0, 2]}, "outside"),
    ({"layers": [0, 0]}, "duplicates"),
])
def test_invalid_config_values(good, changes, match):
    edit_config(good, **changes)
    expect(good, match)


def test_rational_degree_keys_only_with_rational(adapter_factory, tmp_path):
    src = adapter_factory("good-gelu", activation="gelu")
    dst = tmp_path / "gelu"
    shutil.copytree(src, dst)
    assert load_adapter(dst).config.activation == "gelu"
    edit_config(dst, rational_numerator_degree=5)
    expect(dst, "only allowed with activation 'rational'")


def test_missing_tensor(good):
    edit_tensors(good, lambda t: t.pop("layers.1.pool.query"))
    expect(good, r"missing tensors \['layers.1.pool.query'\]")


def test_extra_tensor(good):
    # A file larger than its config implies is refused before its data is read.
    edit_tensors(good, lambda t: t.__setitem__("layers.1.lora_A", torch.zeros(2)))
    expect(good, r"more than its config's tensor shapes and its header imply")
    # Same size as expected (a tensor swapped for an unexpected one): named.
    edit_tensors(good, lambda t: (t.__setitem__("layers.1.lora_A", t.pop("layers.1.down.bias"))))
    expect(good, r"unexpected tensors \['layers.1.lora_A'\]|missing tensors")


def test_misshapen_tensor(good):
    edit_tensors(good, lambda t: t.__setitem__("layers.0.down.weight", torch.zeros(8, 64)))
    expect(good, r"'layers.0.down.weight' has shape \(8, 64\), expected \(8, 128\)")


def test_non_finite_tensor(good):
    def poison(t):
        t["layers.1.up.bias"][3] = float("nan")
    edit_tensors(good, poison)
    expect(good, "'layers.1.up.bias' has non-finite values")


def test_wrong_dtype(good):
    edit_tensors(good, lambda t: t.__setitem__("layers.0.up.bias", t["layers.0.up.bias"].half()))
    expect(good, "'layers.0.up.bias' has dtype float16, but torch_dtype is 'float32'")


def test_not_safetensors(good):
    (good / WEIGHTS).write_bytes(b"\x80\x04pickle-ish garbage")
    expect(good, "not a readable safetensors file")


def test_mismatched_base_model(good):
    expect(good, "hidden_size 128, but the base model has 256", hidden_size=256)
    expect(good, "num_hidden_layers 2, but the base model has 4", num_hidden_layers=4)


def test_bfloat16_adapter_loads(adapter_factory):
    a = load_adapter(adapter_factory("bf16", torch_dtype="bfloat16"))
    assert all(t.dtype == torch.bfloat16 for t in a.tensors.values())


def test_config_model_rejects_bad_python_input():
    with pytest.raises(ValueError):
        AdapterConfig(peft_type="IAPT", format_version=1, hidden_size=8, num_hidden_layers=1,
                      bottleneck_dim=2, activation="relu", torch_dtype="float32", rational_denominator_degree=4)
