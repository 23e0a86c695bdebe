"""bench/peers.py step: one class per method (``setup(model)``, ``step(model, batch) -> global loss``,
``teardown()``): easy_context, torch context parallel, DeepSpeed ALST; and the common loss (``--loss common``)."""
from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from modes import apply_features, parse_mode  # bench/modes.py

from .common import (
    EC_ALGOS,
    STEP_METHODS,
    TORCH_CP,
    Env,
    Skip,
    deepspeed_group,
    ec_options,
    import_peer,
    need_cuda,
    sdpa_backend,
)

# ---------------------------------------------------------------- step: the common loss (--loss common)


def common_loss(hidden, weight, targets, chunk: int, world: int):
    """``--loss common``: rank loss = W * (this rank's CE sum) / (global valid targets), easy_context's chunked
    cross-entropy without liger -> (rank loss, global token mean)."""
    from easy_context.loss import linear_cross_entropy_sum

    local = linear_cross_entropy_sum(hidden, weight, targets, chunk_size=chunk, use_liger=False)
    stats = torch.stack([local.detach().double(), (targets != -100).sum().double()])
    dist.all_reduce(stats)
    n = stats[1].clamp_min(1)
    return local * (world / n).float(), (stats[0] / n).float()


# ---------------------------------------------------------------- step: methods (setup -> step -> teardown)


class EcStep:
    def __init__(self, env: Env, a, name: str):
        self.env, self.a, self.algo, self.opts = env, a, EC_ALGOS[name], ec_options(a, name)
        self.features = parse_mode(a.ec_mode, a.layers)
        if self.features is None:
            raise ValueError("--ec-mode must start with 'ec' (stock is the reference step, not an easy_context mode)")

    def setup(self, model):
        import easy_context as ec

        ec.apply_seq_parallel_monkey_patch(self.algo, model, backend=self.a.ec_backend, **self.opts)
        self.modeling = {type(m).__module__ for m in model.modules() if hasattr(m, "q_proj")}
        apply_features(model, self.features)

    def step(self, model, batch):
        import easy_context as ec

        env, a = self.env, self.a
        p = ec.prepare_seq_parallel_inputs(self.algo, batch["ids"], batch["pos"], batch["tgt"], env.rank, env.world,
                                           env.dev, balance_documents=bool(a.packed), **self.opts)
        hidden = model.model(input_ids=p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
        if a.loss == "native":
            res = ec.sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"], chunk_size=a.loss_chunk)
            loss, glob = res.loss, res.global_loss
        else:
            loss, glob = common_loss(hidden, model.lm_head.weight, p["local_target_ids"], a.loss_chunk, env.world)
        loss.backward()
        return glob

    def teardown(self):
        if self.features.fused_kernels:  # the fused RoPE is module-wide: give the next methods transformers' own
            for name in getattr(self, "modeling", ()):
                fn = getattr(sys.modules[name], "apply_rotary_pos_emb", None)
                if hasattr(fn, "_easy_context_original"):
                    sys.modules[name].apply_rotary_pos_emb = fn._easy_context_original


def _no_mask(*args, **kwargs):
    return None


class TorchCpStep:
    ATTN_NAME = "peers_torch_cp"  # no "sdpa" in it: transformers special-cases that substring

    def __init__(self, env: Env, a, name: str):
        need_cuda(env, "torch context_parallel (its SDPA handlers cover the CUDA flash/efficient/cuDNN ops only)")
        self.env, self.a = env, a
        self.rotate, self.backend = name.split("_")[2:4]
        self.cp = import_peer("torch.distributed.tensor.experimental")
        self.cp_private = import_peer("torch.distributed.tensor.experimental._attention")

    def setup(self, model):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(self.ATTN_NAME, sdpa_attention_forward)
        AttentionMaskInterface.register(self.ATTN_NAME, _no_mask)
        model.set_attn_implementation(self.ATTN_NAME)

    def step(self, model, batch):
        env, a = self.env, self.a
        self.cp_private.set_rotate_method(self.rotate)
        ids, pos, tgt = (batch[n].clone() for n in ("ids", "pos", "tgt"))  # sharded in place
        original_sdpa = F.scaled_dot_product_attention
        try:
            with self.cp.context_parallel(env.mesh, buffers=[ids, pos, tgt], buffer_seq_dims=[1, 1, 1],
                                          no_restore_buffers={ids, pos, tgt}):
                with sdpa_backend(self.backend):  # the backward's checkpoint recompute calls SDPA again: inside
                    if a.loss == "native":
                        count = (tgt != -100).sum().double()
                        dist.all_reduce(count)
                        count = count.clamp_min(1)
                        # the model's own loss as sum / num_items_in_batch: W * local sum / global count per rank
                        out = model(input_ids=ids, position_ids=pos, labels=tgt, shift_labels=tgt,
                                    num_items_in_batch=(count / env.world).float())
                        loss = out.loss
                        del out
                        total = loss.detach().double() * count / env.world
                        dist.all_reduce(total)
                        glob = (total / count).float()
                    else:
                        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state
                        loss, glob = common_loss(hidden, model.lm_head.weight, tgt, a.loss_chunk, env.world)
                    loss.backward()
        finally:
            if F.scaled_dot_product_attention is not original_sdpa:  # see attn_methods.torch_cp_case
                F.scaled_dot_product_attention = original_sdpa
                with contextlib.suppress(Exception):
                    self.cp_private._disable_context_parallel_dispatcher()
        return glob

    def teardown(self):
        pass


_ALST: dict = {}  # register_with_transformers initialises DeepSpeed's SP groups, which it allows once per process


def ds_feature_list(a) -> list[str]:
    """--ds-features, or (auto) DeepSpeed's counterparts of --ec-mode's features: tile -> tiled_mlp, off -> offload."""
    if a.ds_features != ["auto"]:
        return [f for f in a.ds_features if f != "none"]
    f = parse_mode(a.ec_mode, a.layers)
    return (["tiled_mlp"] if f and f.tiled_mlp else []) + (["offload"] if f and f.offload_layers else [])


def ds_loss_kind(env: Env, a) -> str:
    if a.ds_loss != "auto":
        return a.ds_loss
    import importlib.util

    return "liger" if env.cuda and importlib.util.find_spec("liger_kernel") is not None else "tiled"


def _mlp(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


class AlstStep:
    """DeepSpeed ALST's pieces around a plain transformers model (no DeepSpeed engine)."""

    def __init__(self, env: Env, a):
        self.env, self.a = env, a
        self.usp = import_peer("deepspeed.runtime.sequence_parallel.ulysses_sp")
        self.features = ds_feature_list(a)
        self.loss_kind = ds_loss_kind(env, a)

    def setup(self, model):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if "mpu" not in _ALST:
            deepspeed_group(self.env)  # deepspeed.comm on top of the existing torch group
            _ALST["transformers_sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
            _ALST["mpu"] = self.usp.UlyssesSPAttentionHF.register_with_transformers(
                model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=self.env.world,
                micro_batch_size=self.a.batch, seq_length_is_variable=True)
            _ALST["ulysses_sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _ALST["ulysses_sdpa"]  # ALST's wrapper replaces the "sdpa" entry
        self.group = _ALST["mpu"].get_sequence_parallel_group()
        if "tiled_mlp" in self.features:
            tiled = self.usp.TiledMLP

            def forward(mlp, x):  # DeepSpeed's documented LlamaMLP patch: ceil(seq / hidden) shards
                shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
                return tiled.apply(_mlp, mlp, x, shards, [mlp.gate_proj.weight, mlp.up_proj.weight,
                                                          mlp.down_proj.weight])

            for layer in model.model.layers:
                layer.mlp.forward = forward.__get__(layer.mlp)
        self.offload = contextlib.nullcontext
        if "offload" in self.features:
            from deepspeed.runtime.activation_checkpointing.offload_activations import (
                get_checkpoint_hidden_states_offloading_ctx_manager as offloading,
            )

            cuda = self.env.cuda
            self.offload = lambda: offloading(use_pin_memory=cuda, use_streams=cuda)

    def _shard(self, batch):
        adapter = self.usp.UlyssesSPDataLoaderAdapter(
            [{"input_ids": batch["ids"], "position_ids": batch["pos"], "labels": batch["ids"]}],
            sp_rank=self.env.rank, sp_group=self.group, sp_world_size=self.env.world, device=self.env.dev)
        mb = next(iter(adapter))  # sample 0's contiguous chunk for this rank; labels -> shift_labels
        return {k: v.to(self.env.dev) for k, v in mb.items() if torch.is_tensor(v)}

    def _loss_sum(self, model, hidden, labels):
        if self.loss_kind == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy(input=hidden.reshape(-1, hidden.shape[-1]),
                                                    weight=model.lm_head.weight, target=labels.reshape(-1),
                                                    ignore_index=-100, reduction="sum").float()

        def ce(x, y):
            return F.cross_entropy(model.lm_head(x).float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                   reduction="sum")

        seq = hidden.shape[1]
        return self.usp.sequence_tiled_compute(
            ce, seq, max(1, math.ceil(seq / self.a.loss_chunk)), {"x": hidden, "y": labels}, {}, "x",
            compute_params=[model.lm_head.weight], output_unshard_dimension=0, output_reduction="sum")

    def step(self, model, batch):
        env, a = self.env, self.a
        mb = self._shard(batch)
        with self.offload(), sdpa_backend(a.sdpa_backend):  # backward inside: the recompute calls SDPA again
            hidden = model.model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).last_hidden_state
            labels = mb["shift_labels"]
            if a.loss == "native":
                good = (labels != -100).sum()
                mean = self._loss_sum(model, hidden, labels) / good.clamp_min(1)
                # the ALST recipe: every rank's mean, gathered differentiably, weighted by its valid targets
                means = torch.distributed.nn.functional.all_gather(mean, group=self.group)
                goods = [torch.zeros_like(good) for _ in range(env.world)]
                dist.all_gather(goods, good, group=self.group)
                loss = sum(m * g for m, g in zip(means, goods)) / torch.stack(goods).sum().clamp_min(1)
                glob = loss.detach()
            else:
                loss, glob = common_loss(hidden, model.lm_head.weight, labels, a.loss_chunk, env.world)
            loss.backward()
        return glob

    def teardown(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if "transformers_sdpa" in _ALST:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _ALST["transformers_sdpa"]


def step_method(env: Env, a, name: str):
    if name in EC_ALGOS:
        return EcStep(env, a, name)
    if a.packed:
        raise Skip("--packed: the peers' steps here take one document per row")
    if name in TORCH_CP:
        return TorchCpStep(env, a, name)
    if name == "ds_alst":
        return AlstStep(env, a)
    raise ValueError(f"unknown step method {name!r}; choose from {', '.join(STEP_METHODS)}")
