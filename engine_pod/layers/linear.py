"""Linear layers sharded for tensor parallelism; each parameter knows how to load its shard.

FP8 checkpoints (engine_pod/quantization.py parses the config; `quantize_model` below applies it):
`use_fp8(scheme)` swaps the weight for a float8_e4m3fn one and adds `weight_scale` (`weight_scale_inv` for
the fp8 method's block-wise scales; float32, one row per output row of this rank: [rows, 1] for per-tensor
and per-channel scales, [rows, column blocks] for block-wise ones) and, for static activations,
`input_scale`.
Each loads through the same shard geometry as the weight (`output_shard`, `input_shard`); after loading,
`process_weights_after_loading` either keeps FP8 for `torch._scaled_mm` (CUDA, per-tensor/channel) or
dequantizes to the model's dtype (CPU, block-wise, weight-only).
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.layers.parallel import all_reduce, divide, tp_rank, tp_size
from nanoserve.engine_pod.quantization import FP8_MAX, Fp8Scheme, QuantConfig, parse_quantization_config

FP8 = torch.float8_e4m3fn


class LinearBase(nn.Module):
    weight_scale: nn.Parameter | None
    input_scale: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.fp8: Fp8Scheme | None = None  # FP8 weights to run as such (None: plain, or dequantized at load)
        self.weight = self._param(torch.empty(out_features, in_features))
        if bias:
            self.bias = self._param(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.register_parameter("weight_scale", None)
        self.register_parameter("input_scale", None)

    def _param(self, data: torch.Tensor) -> nn.Parameter:
        param = nn.Parameter(data, requires_grad=False)
        param.weight_loader = self.weight_loader  # pyright: ignore[reportAttributeAccessIssue]  # the loader rides on the parameter, as in Nano-vLLM
        return param

    def output_shard(self, shard_id=None) -> tuple[int, int, int]:
        """(first row in our weight, rows, first row in the checkpoint tensor) of checkpoint part `shard_id`."""
        return 0, self.out_features, 0

    def input_shard(self) -> int:
        """The first checkpoint column of our weight."""
        return 0

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        start, rows, src = self.output_shard(shard_id)
        if self.fp8 is not None and param is self._parameters.get(self.fp8.scale_name):
            self._load_weight_scale(param, loaded, start, rows, src)
        elif param is self.input_scale:  # a merged layer's parts each bring one: the max, as vLLM
            param.data.copy_(torch.maximum(param.data, loaded.float().max().to(param.device)))
        else:
            if param is self.weight:
                loaded = loaded.narrow(1, self.input_shard(), self.in_features)
            param.data.narrow(0, start, rows).copy_(loaded.narrow(0, src, rows))

    # ---- FP8 ------------------------------------------------------------------------------------
    def use_fp8(self, scheme: Fp8Scheme) -> None:
        """Hold float8 weights and their scales instead (called before loading, under the model's dtype)."""
        self.fp8, self.dtype = scheme, self.weight.dtype
        columns = 1
        if scheme.block_size is not None:
            bk = scheme.block_size[1]
            if self.input_shard() % bk:
                raise ModelLoadError(
                    f"a rank's {self.in_features} input features are not a multiple of the FP8 weight block's "
                    f"{bk} columns (quantization_config weight block size {list(scheme.block_size)}): "
                    "use a tensor_parallel_size that keeps them whole"
                )
            columns = -(-self.in_features // bk)
        self.weight = self._param(torch.empty(self.out_features, self.in_features, dtype=FP8))
        scale = self._param(torch.zeros(self.out_features, columns, dtype=torch.float32))
        self.register_parameter(scheme.scale_name, scale)  # weight_scale, or the fp8 method's weight_scale_inv
        if scheme.activations == "static":
            self.input_scale = self._param(torch.zeros((), dtype=torch.float32))

    def _load_weight_scale(self, param: nn.Parameter, loaded: torch.Tensor, start: int, rows: int, src: int):
        assert self.fp8 is not None
        loaded = loaded.float()
        try:
            if self.fp8.block_size is not None:
                bn, bk = self.fp8.block_size
                if loaded.ndim != 2:
                    raise RuntimeError("expected a 2-d grid of block scales")
                part = loaded.repeat_interleave(bn, 0).narrow(0, src, rows)
                part = part.narrow(1, self.input_shard() // bk, param.shape[1])
            elif loaded.numel() == 1:  # per tensor (of this checkpoint part)
                part = loaded.reshape(1, 1).expand(rows, 1)
            else:  # per output channel
                part = loaded.reshape(-1, 1).narrow(0, src, rows)
            param.data.narrow(0, start, rows).copy_(part)
        except RuntimeError as e:
            raise ModelLoadError(
                f"an FP8 weight scale of shape {list(loaded.shape)} does not fit the "
                f"{self.fp8.weight_strategy}-wise scheme of a [{rows}, {self.in_features}] weight part: {e}"
            ) from None

    def process_weights_after_loading(self) -> None:
        scheme = self.fp8
        if scheme is None:
            return
        param = self._parameters[scheme.scale_name]
        assert param is not None
        w, scale = self.weight.data, param.data
        if w.is_cuda and scheme.block_size is None and scheme.activations is not None and _scaled_mm_fits(w):
            self.weight_scale = nn.Parameter(scale.reshape(1, -1).contiguous(), requires_grad=False)  # [1, N]
            return
        if scheme.block_size is not None:
            scale = scale.repeat_interleave(scheme.block_size[1], 1)[:, : w.shape[1]]
        self.weight = nn.Parameter((w.to(torch.float32) * scale).to(self.dtype), requires_grad=False)
        self.register_parameter(scheme.scale_name, None)
        self.weight_scale = self.input_scale = None
        self.fp8 = None

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, self.weight, bias)
        assert self.weight_scale is not None
        return fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.fp8.activations, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


def _scaled_mm_fits(w: torch.Tensor) -> bool:
    """Row-wise scaled FP8 GEMMs: compute capability 8.9+ and both weight dims multiples of 16."""
    return torch.cuda.get_device_capability(w.device) >= (8, 9) and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    activations: str | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x @ (weight * weight_scale).T on CUDA in FP8: `x` quantized per token (dynamic "token"), per tensor
    (dynamic "tensor") or by the static `input_scale`; weight [N, K] float8_e4m3fn, weight_scale [1, N]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if activations == "static":
        assert input_scale is not None
        sx = input_scale.reshape(1, 1).expand(x2.shape[0], 1)
    else:
        amax = x2.abs().amax(-1, keepdim=True) if activations == "token" else x2.abs().amax().reshape(1, 1)
        sx = (amax.float() / FP8_MAX).clamp(min=1e-12).expand(x2.shape[0], 1)
    sx = sx.contiguous()
    xq = (x2.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    y = torch._scaled_mm(  # pyright: ignore[reportPrivateImportUsage]
        xq, weight.t(), scale_a=sx, scale_b=weight_scale, out_dtype=torch.bfloat16
    )
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, divide(out_features, "output features"), bias)

    def output_shard(self, shard_id=None) -> tuple[int, int, int]:
        return 0, self.out_features, tp_rank() * self.out_features


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def output_shard(self, shard_id=None) -> tuple[int, int, int]:
        assert isinstance(shard_id, int)
        size = self.out_sizes[shard_id] // tp_size()
        return sum(self.out_sizes[:shard_id]) // tp_size(), size, tp_rank() * size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; each rank holds its heads of each."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, "num_attention_heads")
        self.num_kv_heads = divide(num_kv_heads, "num_key_value_heads")
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def output_shard(self, shard_id=None) -> tuple[int, int, int]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[str(shard_id)]
        return offset, size, tp_rank() * size


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial sums are all-reduced (bias added once, on rank 0), unless
    `reduce_results` is False: then the caller sums them (an MoE block's shared expert, with its experts)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True):
        super().__init__(divide(in_features, "input features"), out_features, bias)
        self.reduce_results = reduce_results

    def input_shard(self) -> int:
        return tp_rank() * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x, self.bias if tp_rank() == 0 else None)
        return all_reduce(y) if self.reduce_results else y


def quantize_model(model: nn.Module, cfg: dict) -> QuantConfig | None:
    """Make the linear layers of a freshly built model FP8 where config.json's quantization_config says so
    (each layer then loads float8 weights and their scales); build under the model's default dtype and
    device. A merged layer (qkv_proj, gate_up_proj) is skipped only if all of its checkpoint parts are."""
    qcfg = parse_quantization_config(cfg)
    if qcfg is None:
        return None
    if getattr(model, "moe", None) is not None:
        raise ModelLoadError(
            f"quantization_config.quant_method={qcfg.method!r} is supported for dense models only, "
            "not the experts of a mixture-of-experts model"
        )
    packed: dict = getattr(model, "packed_modules_mapping", {})
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        parent, _, leaf = name.rpartition(".")
        parts = [hf for hf, (ours, _) in packed.items() if ours == leaf] or [leaf]
        skipped = [qcfg.ignored(f"{parent}.{p}" if parent else p) for p in parts]
        if all(skipped):
            continue
        if any(skipped):
            field = "ignore" if qcfg.method == "compressed-tensors" else "ignored_layers"
            raise ModelLoadError(
                f"quantization_config.{field} skips only some of {', '.join(f'{parent}.{p}' for p in parts)}, "
                f"which nanoserve runs as one layer ({name}): all or none must be quantized"
            )
        module.use_fp8(qcfg.scheme)
    return qcfg
