"""easy_context.prepare_trainer (integrations/trainer.py): transformers' Trainer and TRL's SFTTrainer on 2 gloo ranks
(and DP x SP on 4) give the losses per logged step, the gradient norms, the evaluation loss and the final parameters
of the same trainer in one process without sequence parallelism; the saved model is a plain HF checkpoint; the bad
inputs of the issue raise errors that name the fix.

Process starts dominate on a 2-core box: the one-process references run in this process, every 2-rank case in one
spawned world and the DP x SP cases in one 4-rank world.
"""
import os

import numpy as np
import pytest
import torch
from _dist import run_distributed

pytest.importorskip("trl")
pytest.importorskip("peft")

ALGOS = ("zigzag_ring_attn", "ulysses_attn", "usp_attn")
VOCAB, SEQ, STEPS, GA = 128, 64, 3, 2
# fp32. The SP runs differ from one process only in summation order (ring / all-to-all merges of the attention,
# per-rank partial cross-entropy sums, the gradient all-reduce): ~1e-7 relative per op, ~1e-6 after two layers and
# backward (tests/_models.py SP_RTOL). SGD makes a parameter's difference lr x (the difference of its summed
# gradients), i.e. ~1e-6 of one update, and the losses of later steps move by less (measured: losses <= 2e-7
# relative, parameters <= 2e-7 of their largest magnitude). 1e-5 leaves a wide margin, while a mis-scaled loss (a
# factor sp or W, a per-rank mean, GA dividing twice) or SP ranks reading different rows change the second step's
# loss and the parameters by > 1e-2.
RTOL = 1e-5


# ---------------------------------------------------------------- the trainers (built the same way in every world)
def _model(heads=4, kv=2, lora=False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t2", unk_token="t1")


def _rows(kind):
    """SFT rows of one length with -100 prompts of varying length, or documents of varying length."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(16):
        if kind == "sft":
            ids = torch.randint(3, VOCAB, (SEQ,), generator=g)
            labels = ids.clone()
            labels[:3 + 3 * i] = -100  # the prompt: no loss
            rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
        else:  # documents of 7..37 tokens; completion_mask: the completion after a prompt of 2..9 tokens
            n = 7 + int(torch.randint(0, 31, (1,), generator=g))
            prompt = 2 + i % 8
            rows.append({"input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist(),
                         "completion_mask": [0] * prompt + [1] * (n - prompt)})
    from datasets import Dataset

    return Dataset.from_list(rows)


def _args(root, batch, sft=False, **extra):
    common = dict(output_dir=root, per_device_train_batch_size=batch, per_device_eval_batch_size=2,
                  gradient_accumulation_steps=GA, max_steps=STEPS, learning_rate=0.5, optim="sgd", logging_steps=1,
                  report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                  seed=7, include_num_input_tokens_seen=True, **extra)
    if sft:
        from trl import SFTConfig

        return SFTConfig(bf16=False, **common)  # SFTConfig's default is bf16 autocast, also on CPU
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def make_trainer(case, root, batch, heads=4, kv=2):
    """The trainer of ``case``: sft (Trainer, -100 prompts, GA), flat (DataCollatorWithFlattening), lora,
    sft_completion (SFTTrainer, completion-only loss, padding-free), sft_packing (SFTTrainer, packing=True)."""
    from transformers import DataCollatorWithFlattening, Trainer

    if case.startswith("sft_"):
        from trl import SFTTrainer

        extra = (dict(completion_only_loss=True, padding_free=True, max_length=None) if case == "sft_completion" else
                 dict(packing=True, max_length=SEQ, completion_only_loss=False))
        ds = _rows("docs")
        return SFTTrainer(model=_model(heads, kv), args=_args(root, batch, sft=True, **extra), train_dataset=ds,
                          eval_dataset=ds.select(range(8)), processing_class=_tokenizer())
    ds = _rows("docs" if case == "flat" else "sft")
    if case == "flat":
        ds = ds.remove_columns("completion_mask")
    collator = DataCollatorWithFlattening() if case == "flat" else None
    return Trainer(model=_model(heads, kv, lora=case == "lora"), args=_args(root, batch), train_dataset=ds,
                   eval_dataset=ds.select(range(8)), data_collator=collator)


def train_and_measure(trainer, save=None):
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    out = {"losses": [h["loss"] for h in logs], "grad_norms": [h["grad_norm"] for h in logs],
           "tokens_per_second": [h.get("tokens_per_second") for h in logs],
           "tokens_seen": [h["num_input_tokens_seen"] for h in logs],  # counted by every rank, once per replica here
           "total_batch": trainer.get_total_train_batch_size(trainer.args),  # behind train_samples_per_second
           "eval_loss": trainer.evaluate()["eval_loss"],
           "params": {n: p.detach().float().numpy().copy() for n, p in trainer.model.named_parameters()
                      if p.requires_grad}}
    if save:
        trainer.save_model(save)
    return out


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _env(rank, world, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# ---------------------------------------------------------------- the worlds
CASES_2 = [(case, algo) for case in ("sft", "flat", "lora", "sft_completion", "sft_packing") for algo in ALGOS]


def _two_rank_worker(rank, world, root):
    import easy_context

    _env(rank, world, 29571)
    out = {}
    for case, algo in CASES_2:
        _reset_accelerate()
        trainer = easy_context.prepare_trainer(make_trainer(case, f"{root}/{case}_{algo}", batch=2), algo)
        save = f"{root}/saved" if (case, algo) == ("sft", "zigzag_ring_attn") else None
        out[case, algo] = train_and_measure(trainer, save)
    out["errors"] = _errors(root)
    return out


def _errors(root):
    """Each bad input of the issue: the error's message (every rank raises it)."""
    from transformers import TrainerCallback

    import easy_context

    def message(fn):
        _reset_accelerate()
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    found = {"sp_size 3 of 2 ranks": message(
        lambda: easy_context.prepare_trainer(make_trainer("sft", f"{root}/e1", 2), "zigzag_ring_attn", sp_size=3))}
    found["ulysses, 3 heads on 2 ranks"] = message(
        lambda: easy_context.prepare_trainer(make_trainer("sft", f"{root}/e2", 2, heads=3, kv=3), "ulysses_attn"))

    def padded():
        trainer = make_trainer("sft", f"{root}/e3", 2)

        def pad_collator(rows):  # right-padding with an attention mask, as DataCollatorWithPadding does
            ids = torch.tensor([r["input_ids"] for r in rows])
            mask = torch.ones_like(ids)
            mask[:, -5:] = 0
            return {"input_ids": ids, "labels": torch.tensor([r["labels"] for r in rows]), "attention_mask": mask}

        trainer.data_collator = pad_collator
        easy_context.prepare_trainer(trainer, "zigzag_ring_attn").train()

    found["padding attention_mask"] = message(padded)

    class Late(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            easy_context.prepare_trainer(self.trainer, "zigzag_ring_attn")

    def late():
        trainer = make_trainer("sft", f"{root}/e4", 2)
        trainer.add_callback(Late())
        trainer.callback_handler.callbacks[-1].trainer = trainer
        trainer.train()

    found["after train() began"] = message(late)

    def twice():
        trainer = easy_context.prepare_trainer(make_trainer("sft", f"{root}/e5", 2), "zigzag_ring_attn")
        easy_context.prepare_trainer(trainer, "zigzag_ring_attn")

    found["twice"] = message(twice)
    return found


def _four_rank_worker(rank, world, root):
    import easy_context

    _env(rank, world, 29573)
    out = {}
    for algo in ALGOS:  # 2 replicas x 2 SP ranks, one row per replica per micro-batch
        _reset_accelerate()
        trainer = easy_context.prepare_trainer(make_trainer("sft", f"{root}/dpsp_{algo}", batch=1), algo, sp_size=2)
        out[algo] = train_and_measure(trainer)
    return out


# ---------------------------------------------------------------- the checks
def _close(actual, expected, what):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    scale = float(np.abs(expected).max()) + 1e-12
    assert actual.shape == expected.shape and err <= RTOL * scale, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"


def _same_run(result, reference, what):
    assert len(result["losses"]) == STEPS, f"{what}: {len(result['losses'])} logged steps"
    _close(result["losses"], reference["losses"], f"{what} losses")
    _close(result["grad_norms"], reference["grad_norms"], f"{what} gradient norms")
    _close(result["eval_loss"], reference["eval_loss"], f"{what} eval loss")
    assert result["tokens_seen"] == reference["tokens_seen"], f"{what}: {result['tokens_seen']} tokens seen"
    assert result["total_batch"] == reference["total_batch"], f"{what}: total batch {result['total_batch']}"
    assert result["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        _close(result["params"][name], value, f"{what} {name}")
    assert all(t and t > 0 for t in result["tokens_per_second"]), f"{what}: tokens/s {result['tokens_per_second']}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    refs = {}
    for case in ("sft", "flat", "lora", "sft_completion", "sft_packing"):
        _reset_accelerate()
        trainer = make_trainer(case, f"{root}/{case}", batch=2)  # the trainer's own loss, no SP
        refs[case] = train_and_measure(trainer)
    return refs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("w2")
    return run_distributed(_two_rank_worker, 2, str(root), timeout=400), root


def test_trainer_matches_one_process(references, two_ranks):
    results, _ = two_ranks
    for case, algo in CASES_2:
        _same_run(results[0][case, algo], references[case], f"{case} {algo}")
        _close(results[1][case, algo]["losses"], results[0][case, algo]["losses"], f"{case} {algo} rank 1")
    assert references["sft"]["losses"][0] != references["sft"]["losses"][-1]  # the runs train


def test_saved_model_is_plain_hf_checkpoint(references, two_ranks):
    from transformers import AutoModelForCausalLM

    _, root = two_ranks
    reloaded = AutoModelForCausalLM.from_pretrained(f"{root}/saved")
    assert reloaded.config._attn_implementation == "sdpa"
    params = {n: p.detach().numpy() for n, p in reloaded.named_parameters()}
    for name, value in references["sft"]["params"].items():
        _close(params[name], value, f"reloaded {name}")


def test_dp_x_sp_matches_one_process(references, tmp_path):
    results = run_distributed(_four_rank_worker, 4, str(tmp_path), timeout=400)
    # one row per replica and micro-batch on 2 replicas = the one-process run with two rows per micro-batch
    for algo in ALGOS:
        _same_run(results[0][algo], references["sft"], f"DP x SP {algo}")
        _close(results[3][algo]["params"]["lm_head.weight"], references["sft"]["params"]["lm_head.weight"],
               f"DP x SP {algo} rank 3")


def test_bad_inputs_name_the_fix(two_ranks):
    errors = two_ranks[0][0]["errors"]
    expected = {"sp_size 3 of 2 ranks": "does not divide the world size 2",
                "ulysses, 3 heads on 2 ranks": "another seq_algo",
                "padding attention_mask": "padding-free collator",
                "after train() began": "called after train() began",
                "twice": "called twice"}
    for what, fragment in expected.items():
        assert errors[what] is not None and fragment in errors[what], f"{what}: {errors[what]!r}"
