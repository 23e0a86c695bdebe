"""The training-script API: patch the model, shard the inputs, feed the ranks, reassemble outputs.

Typical use (launch: ``accelerate launch train.py``)::

    apply_seq_parallel_monkey_patch("zigzag_ring_attn", "llama")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    ...
    prepared = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, pos, tgt, rank, world, device)
    logits = model(prepared["local_input_ids"], position_ids=prepared["local_position_ids"]).logits

DP x SP: the world splits into ``world / sp_size`` data-parallel replicas of ``sp_size`` consecutive ranks that
share one sequence. Every function takes the settings as one :class:`~easy_context.SPAttentionConfig` (built and
checked once; pass the same object to every call)::

    sp = SPAttentionConfig("usp_attn", sp_size=4, ring_degree=2)
    apply_seq_parallel_monkey_patch(sp, model)
    prepared = prepare_seq_parallel_inputs(sp, ids, pos, tgt, rank, world, device)

or, as in the seed, as an algorithm name plus keywords (``sp_size=``, ``ring_degree=``), parsed into the same object.
"""
from __future__ import annotations

import torch

from .attention.dist_flash import DOCUMENTS_UNSUPPORTED
from .attention.documents import check_positions
from .attention.registry import SEQ_ALGOS, gather_sequence, get_algorithm, sequence_granularity, shard_sequence
from .sp_config import SPAttentionConfig, sp_config
from .utils import check_sp_size, rank_world


def _sp_rank_size(rank: int, world_size: int, sp_size: int | None) -> tuple[int, int]:
    """(rank within its SP group, SP group size) for global ``rank`` of ``world_size``."""
    sp = check_sp_size(sp_size, world_size)
    return rank % sp, sp


def apply_seq_parallel_monkey_patch(seq_algo: str | SPAttentionConfig, model, *, sp_size: int | None = None,
                                    ring_degree: int | None = None, backend: str | None = None):
    """Make a transformers causal LM attend with the exact sequence-parallel algorithm ``seq_algo``.

    Args:
        seq_algo: an :class:`SPAttentionConfig`, or one of ``SEQ_ALGOS`` with the settings as keywords (not both).
            ``"data_parallel"`` changes nothing.
        model: a model-type string (``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``), called before the model
            exists: every model of that type created afterwards (``from_pretrained`` with any
            ``attn_implementation``, ``from_config``, the constructor) uses the SP attention. Or a loaded
            ``PreTrainedModel`` of any decoder whose attention goes through transformers' ``AttentionInterface``:
            only that model is switched.
        sp_size: ranks per sequence-parallel group (None = the whole world); must divide the world size.
        ring_degree: ``usp_attn`` only (ring x Ulysses split of the SP group).
        backend: local attention kernel backend of the core (None = its default).
    Returns:
        The registered ``attn_implementation`` name (None for ``data_parallel``).
    Raises:
        ValueError: unknown ``seq_algo``, unsupported model type, bad options.
        TypeError: a model object whose attention does not go through ``AttentionInterface``.
    Notes:
        Under SP the model must be called without ``attention_mask`` padding (use right-padding with -100 targets,
        as :func:`prepare_seq_parallel_inputs` does), with packed rows given as position ids that restart at 0 (not
        flash-attn varlen arguments), and with sequences no longer
        than an active sliding window; each of these raises a clear error instead of computing something else.
    """
    from .integrations import hf
    from .loss import watch_data_parallel_wrappers

    config = sp_config(seq_algo, sp_size=sp_size, ring_degree=ring_degree, backend=backend)
    watch_data_parallel_wrappers()  # so that a loss computed around a DDP wrapper's forward is refused
    if not config.sequence_parallel:
        if isinstance(model, str):
            hf.pretrained_base(model)  # still reject unsupported model types
        return None
    if isinstance(model, str):
        return hf.patch_model_type(model, config)
    hf.patch_model(model, config)
    return config.name


def prepare_seq_parallel_inputs(seq_algo: str | SPAttentionConfig, input_ids: torch.Tensor,
                                position_ids: torch.Tensor | None, target_ids: torch.Tensor | None, rank: int,
                                world_size: int, device, *,
                                sp_size: int | None = None, ring_degree: int | None = None, pad_token_id: int = 0,
                                ignore_index: int = -100, balance_documents: bool = False) -> dict:
    """This rank's shard of a batch of full sequences, padded so that any length works.

    Args:
        seq_algo: the :class:`SPAttentionConfig` the model was patched with, or the algorithm name with ``sp_size`` /
            ``ring_degree`` as keywords (the same values as for the patch).
        input_ids: ``(batch, seq)`` the full sequences (same on every rank of the SP group).
        position_ids: ``(batch or 1, seq)`` positions, or None for ``0..seq-1``. Packed rows: positions restart at 0
            at each document start (transformers' convention); with the patched model each token then attends only
            within its document (every algorithm but ``dist_flash_attn``, which raises).
        target_ids: ``(batch, seq)`` already-shifted targets (target of t = token t+1), ``ignore_index`` where no
            loss; or None.
        rank, world_size: this process's global rank and the world size (``accelerator.process_index`` /
            ``num_processes``); with ``sp_size`` they are mapped to the rank within the SP group.
        device: where the shards go.
        sp_size, ring_degree: as in :func:`apply_seq_parallel_monkey_patch` (use the same values).
        pad_token_id: id written into padded input positions (any valid id: nothing real attends to them).
        balance_documents: packed rows under a ring (``zigzag_ring_attn``, ``usp_attn``): reorder each row's
            documents so that the ranks' causal attention work is balanced (documents are independent: the
            per-document results and the loss are the same in any order; ``documents.balanced_order``). The shards,
            and what :func:`gather_seq_parallel_outputs` returns, are then in the new order: for training, not for
            evaluation that needs token order. ``train.py`` turns it on for packed data.
    Returns:
        ``{"local_input_ids", "local_position_ids", "local_target_ids"}``, each ``(batch, padded_seq / sp)``
        (``local_target_ids`` is None when ``target_ids`` is None), and ``"work_balance"``: with
        ``balance_documents``, the busiest ring position's causal attention work over the mean after reordering,
        the worst row of the batch (1.0: balanced; an algorithm without a ring: 1.0); else None. The sequence is
        right-padded to a multiple of ``sequence_granularity``: padded inputs ``pad_token_id``, positions continue
        past the end, targets ``ignore_index``. Causal attention makes the padding invisible to the real tokens, so
        results are exact.
        ``data_parallel`` returns the full (unpadded) tensors.
    Raises:
        ValueError: unknown ``seq_algo``, ``rank`` outside ``[0, world_size)``, ``rank`` / ``world_size`` that are
            not this process's (torch.distributed initialised, a sequence-parallel ``seq_algo``), ``sp_size`` not
            dividing ``world_size``, mismatched shapes, positions that neither count up by one nor restart at 0,
            packed rows for ``dist_flash_attn``, or ranks of one SP group given different batches (below).
        TypeError: ids, positions or targets that are not integer tensors (float ids are never truncated).
    Notes:
        Collective over the SP group when torch.distributed is initialised and the batch is sharded: one all-gather
        of a few integers per call (the batch shape and a checksum of the ids, positions and targets, see
        ``comm.fingerprint``), so that ranks given different rows, tokens or lengths (a DistributedSampler, or
        ``accelerator.prepare(dataloader)``, gives each rank its own rows) all raise before any attention
        collective instead of training on a sequence no rank has. Every rank of the world must call it.
    """
    config = sp_config(seq_algo, sp_size=sp_size, ring_degree=ring_degree)
    seq_algo, sp_size, opts = config.seq_algo, config.sp_size, config.options
    _check_rank(config.sequence_parallel, rank, world_size)
    sp_rank, sp_world = _sp_rank_size(rank, world_size, sp_size)
    for name, x in (("input_ids", input_ids), ("position_ids", position_ids), ("target_ids", target_ids)):
        if x is not None and (not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype.is_complex
                              or x.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor (token ids / positions), got "
                            f"{getattr(x, 'dtype', type(x).__name__)}: convert it where it was made (e.g. "
                            "torch.tensor(rows, dtype=torch.long)); float values are not rounded here")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[1] != seq:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must be (batch or 1, {seq})")
    if target_ids is not None and target_ids.shape != input_ids.shape:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    sequence_parallel = config.sequence_parallel and sp_world > 1
    if sequence_parallel:
        if _distributed():  # before any check that could raise on some ranks only (the others would hang)
            _check_same_batch(seq_algo, rank, sp_size, device, input_ids, position_ids, target_ids)
        check_positions(position_ids)
        if not get_algorithm(seq_algo).documents and bool((position_ids[:, 1:] == 0).any()):
            raise ValueError(DOCUMENTS_UNSUPPORTED)

    pad, balance = 0, None
    if sequence_parallel:
        granularity = sequence_granularity(seq_algo, sp_world, **opts)
        pad = -seq % granularity
        if balance_documents:
            input_ids, position_ids, target_ids, balance = _balance_documents(seq_algo, sp_world, opts, pad,
                                                                              input_ids, position_ids, target_ids)
    if pad:
        # (batch, seq) -> (batch, seq + pad): right padding, positions continue so RoPE and causality stay intact
        input_ids = torch.cat([input_ids, input_ids.new_full((batch, pad), pad_token_id)], dim=1)
        tail = position_ids[:, -1:] + torch.arange(1, pad + 1, device=position_ids.device, dtype=position_ids.dtype)
        position_ids = torch.cat([position_ids, tail], dim=1)
        if target_ids is not None:
            target_ids = torch.cat([target_ids, target_ids.new_full((batch, pad), ignore_index)], dim=1)

    def shard(x):
        if x is None:
            return None
        if sequence_parallel:
            x = shard_sequence(seq_algo, x, sp_rank, sp_world, dim=1, **opts)
        return x.to(device)

    out = {
        "local_input_ids": shard(input_ids),
        "local_position_ids": shard(position_ids),
        "local_target_ids": shard(target_ids),
        "work_balance": balance,
    }
    if sequence_parallel and _distributed():
        from .integrations import shards

        # the model that gets these shards must assemble this layout (not its own attention on each shard)
        shards.expect_sequence_parallel_model(seq_algo, sp_world, opts, out["local_input_ids"],
                                              out["local_position_ids"])
    return out


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _check_rank(sequence_parallel: bool, rank, world_size) -> None:
    """``rank`` in ``[0, world_size)``; for a sequence-parallel algorithm under torch.distributed, the process's own
    rank and world (a shard of another rank, or of a world of another size, would be silently wrong)."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size}): pass this process's global rank and "
                         "the number of processes (accelerator.process_index / accelerator.num_processes)")
    if sequence_parallel and _distributed():
        from .utils import rank_world

        actual = rank_world()
        if actual[1] != world_size:  # the same on every rank: all raise together
            raise ValueError(f"world_size={world_size}, but torch.distributed runs {actual[1]} processes: pass the "
                             "number of processes (dist.get_world_size(); accelerator.num_processes)")
        # a wrong rank is reported by _check_same_batch, after the all-gather, on every rank at once


def _check_same_batch(seq_algo, rank, sp_size, device, input_ids, position_ids, target_ids) -> None:
    """Every rank of the SP group holds the same full batch (shape, ids, positions, targets) and passed its own rank;
    else every rank raises ValueError (one all-gather of 6 integers, before any other collective of the step)."""
    from .attention.comm import fingerprint, gather_ints, get_sp_group, global_rank

    group = get_sp_group(sp_size)
    names = ("rows", "length", "input_ids", "position_ids", "target_ids")
    mine = [*input_ids.shape, fingerprint(input_ids), fingerprint(position_ids), fingerprint(target_ids)]
    table = gather_ints([rank, *mine], group, torch.device(device))
    wrong = {global_rank(group, i): row[0] for i, row in enumerate(table) if row[0] != global_rank(group, i)}
    if wrong:
        raise ValueError(f"prepare_seq_parallel_inputs({seq_algo!r}): the rank argument is not the process's global "
                         f"rank ({', '.join(f'process {p} passed rank={r}' for p, r in wrong.items())}); pass "
                         "accelerator.process_index / dist.get_rank() (not the local rank)")
    differ = [n for i, n in enumerate(names, 1) if any(row[i] != table[0][i] for row in table)]
    if differ:
        ranks = [global_rank(group, i) for i in range(len(table))]
        shapes = ", ".join(f"rank {r}: {row[1]}x{row[2]}" for r, row in zip(ranks, table))
        raise ValueError(f"prepare_seq_parallel_inputs({seq_algo!r}): the ranks of one sequence-parallel group must "
                         f"pass the same full batch, but their {', '.join(differ)} differ (batch shapes {shapes}). "
                         "Each rank would shard another sequence and the attention would mix them (silently wrong "
                         "loss and gradients). Give every rank of an SP group the same rows: "
                         "prepare_dataloader(seq_algo, dataloader, accelerator, sp_size=...) instead of "
                         "accelerator.prepare(dataloader) or a DistributedSampler")


def _balance_documents(seq_algo, world, opts, pad, input_ids, position_ids, target_ids):
    """Each row's documents reordered by :func:`documents.balanced_order` for the algorithm's ring (see
    :func:`prepare_seq_parallel_inputs`); rows of one document, and algorithms without a ring, are unchanged."""
    from .attention.documents import balanced_order, boundaries_from_positions, zigzag_runs

    ring = get_algorithm(seq_algo).ring(world, **opts)
    if ring == 1:
        return input_ids, position_ids, target_ids, 1.0
    batch, seq = input_ids.shape
    position_ids = position_ids.expand(batch, seq)
    local = (seq + pad) // ring
    runs = [zigzag_runs(p, ring, local) for p in range(ring)]
    order, worst = [], 1.0
    for b in range(batch):
        docs = boundaries_from_positions(position_ids[b:b + 1])
        if docs is None:
            order.append(torch.arange(seq))
            continue
        bounds = docs[0]
        perm, cost = balanced_order(bounds, runs, tail=pad)
        worst = max(worst, cost)
        order.append(torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in perm]))
    index = torch.stack(order).to(input_ids.device)

    def take(x):
        return None if x is None else x.gather(1, index.to(x.device))

    return take(input_ids), take(position_ids), take(target_ids), worst


def gather_seq_parallel_outputs(seq_algo: str | SPAttentionConfig, local_outputs: torch.Tensor, *,
                                seq_len: int | None = None, sp_size: int | None = None,
                                ring_degree: int | None = None, dim: int = 1) -> torch.Tensor:
    """Reassemble per-token outputs (argmax predictions, per-token losses, logits) of the SP group in order.

    Collective over the SP group (every rank of the world must call it when ``sp_size`` is set). Not
    differentiable; for evaluation.

    Args:
        local_outputs: this rank's outputs, sharded along ``dim`` as by :func:`prepare_seq_parallel_inputs`.
        seq_len: the original (unpadded) length: the padding added by ``prepare_seq_parallel_inputs`` is cut off.
        seq_algo, sp_size, ring_degree: the config (or name and keywords) used for sharding.
    Returns:
        The full sequence along ``dim`` on every rank of the SP group.
    """
    from .attention.comm import get_sp_group

    config = sp_config(seq_algo, sp_size=sp_size, ring_degree=ring_degree)
    group = get_sp_group(config.sp_size) if config.sequence_parallel else None
    full = gather_sequence(config.seq_algo, local_outputs, group=group, dim=dim, **config.options)
    return full if seq_len is None else full.narrow(dim, 0, seq_len)


def prepare_dataloader(seq_algo: str | SPAttentionConfig, dataloader, accelerator, *, sp_size: int | None = None):
    """Wrap a DataLoader so that ranks of one SP group see the same batches and DP replicas different ones.

    Args:
        seq_algo: the :class:`SPAttentionConfig` of the run, or the algorithm name with ``sp_size`` as a keyword.
        dataloader: a plain ``torch.utils.data.DataLoader`` yielding full sequences.
        accelerator: the ``accelerate.Accelerator`` (device, placement and batching settings are taken from it).
        sp_size: ranks per SP group (None = the whole world: a single replica, every rank sees every batch).
    Returns:
        accelerate's ``prepare_data_loader`` sharded over the ``world / sp_size`` replicas (replica index
        ``rank // sp_size``; ``data_parallel``: every rank a replica), batches moved to ``accelerator.device``.
    Notes:
        Collective when the sampler shuffles without its own generator: a seed is broadcast from rank 0 so all
        ranks shuffle identically. The returned loader is not registered with the accelerator's checkpointing
        (``save_state`` does not record its position).
    """
    config = sp_config(seq_algo, sp_size=sp_size)
    from accelerate.data_loader import prepare_data_loader

    sp_size = config.sp_size if config.sequence_parallel else 1  # data_parallel: every rank its own replica

    # the process group's own rank/world: accelerate's state says process 0 of 1 on every rank of a DeepSpeed launch
    # on CPU, which would give every replica the same rows
    rank, world = rank_world((accelerator.process_index, accelerator.num_processes))
    _, sp_world = _sp_rank_size(rank, world, sp_size)
    _share_shuffle_seed(dataloader, accelerator.device)
    return prepare_data_loader(
        dataloader,
        accelerator.device,
        num_processes=world // sp_world,
        process_index=rank // sp_world,
        split_batches=accelerator.split_batches,
        put_on_device=accelerator.device_placement,
        rng_types=list(accelerator.rng_types or []),
        dispatch_batches=False,  # dispatching would split batches over all ranks, ignoring the SP groups
        even_batches=accelerator.even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler,
        non_blocking=accelerator.non_blocking,
        **_loader_settings(accelerator),
    )


def _loader_settings(accelerator) -> dict:
    """The data seed and stateful-loader choice of the accelerator's dataloader config (Trainer's ``data_seed``), for
    the accelerate versions that have them."""
    config = getattr(accelerator, "dataloader_config", None)
    out = {}
    if getattr(config, "data_seed", None) is not None:
        out["data_seed"] = config.data_seed
    if getattr(config, "use_stateful_dataloader", False):
        out["use_stateful_dataloader"] = True
    return out


def _share_shuffle_seed(dataloader, device) -> None:
    """Give a shuffling sampler without a generator one seeded identically on every rank.

    Otherwise each process would draw its own permutation from its global RNG and the ranks of an SP group
    would get different sequences.
    """
    import torch.distributed as dist

    sampler = getattr(dataloader, "sampler", None)
    if not isinstance(sampler, torch.utils.data.RandomSampler) or sampler.generator is not None:
        return
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        seed = seed.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(seed, src=0)
    sampler.generator = torch.Generator().manual_seed(int(seed.item()))


__all__ = ["SEQ_ALGOS", "SPAttentionConfig", "apply_seq_parallel_monkey_patch", "prepare_seq_parallel_inputs",
           "prepare_dataloader", "gather_seq_parallel_outputs"]
