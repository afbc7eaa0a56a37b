"""mode.hf.MoDETrainer: two steps with transformers' Trainer and with TRL's SFTTrainer (the mixin) lower
the task loss on a toy task, add the KD term, and save the adapters only; under torchrun (2 gloo
processes, the Trainer's own DDP) it steps like one process on the global batch."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import BEGIN_IMAGE, END_IMAGE, IMAGE_HI, IMAGE_LO, SPECS, VOCAB, config, peft_config, tiny_model

import mode
import mode.hf
import mode.hf.trainer  # the module itself (mode.hf loads it on first use of MoDETrainer)
from mode.gradient_checkpointing import RoutedCheckpoint

pytest.importorskip("trl")

# Toy task: "<question ids> <boi> codes <eoi>" -> the answer id, always 7; labels on the answer only.
QUESTION, ANSWER = [3, 4, 5], 7


def _task_rows(n=8):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        codes = torch.randint(IMAGE_LO, IMAGE_HI, (4,), generator=gen).tolist()
        ids = QUESTION + [BEGIN_IMAGE] + codes + [END_IMAGE, ANSWER]
        rows.append({"input_ids": ids, "labels": [-100] * (len(ids) - 1) + [ANSWER]})
    return rows


def _gen_rows(n=8):
    """Generation stream: caption, <boi>, codes, <eoi>; the image part scored."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = [9, 10, BEGIN_IMAGE] + torch.randint(IMAGE_LO, IMAGE_HI, (6,), generator=gen).tolist() + [END_IMAGE]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def _task_loss(model) -> float:
    batch = {k: torch.tensor([r[k] for r in _task_rows()]) for k in ("input_ids", "labels")}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(was_training)
    return loss


def _tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over ids 0..vocab-1 (TRL needs one for padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1", unk_token="t0")


COMMON_ARGS = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=2e-2, lr_scheduler_type="constant",
                   logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)


def _model(builder):
    base = tiny_model()
    torch.manual_seed(0)  # the same adapter init on every call
    if builder == "apply_mode":
        return mode.apply_mode(base, config())
    from peft import get_peft_model
    return get_peft_model(base, peft_config())


def _check_saved_adapters(trainer, model, path):
    trainer.save_model(str(path))
    names = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}  # adapters only
    reloaded = mode.load_adapter(tiny_model(), path)
    ids = torch.tensor([_task_rows()[0]["input_ids"]])
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("builder", ["apply_mode", "peft"])
def test_trainer_two_steps_lower_the_loss(builder, tmp_path):
    from transformers import TrainingArguments

    model = _model(builder)
    before = _task_loss(model)
    trainer = mode.hf.MoDETrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), **COMMON_ARGS),
                                  train_dataset=_task_rows(), gen_dataset=_gen_rows(), kd_lambda=0.3)
    trainer.train()
    after = _task_loss(model)
    assert after < before - 0.05, (before, after)
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 2 and logged[0]["kd_loss"] == 0.0 < logged[1]["kd_loss"]  # fresh adapters equal the teacher
    _check_saved_adapters(trainer, model, tmp_path / "final")


def test_sft_trainer_two_steps_lower_the_loss(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    model = _model("peft")
    before = _task_loss(model)
    # SFTConfig turns gradient checkpointing on by default: MoDE layers are recomputed under it.
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, **COMMON_ARGS)
    assert args.gradient_checkpointing
    task = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [0] * 9 + [1]} for r in _task_rows()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. TRL's "recomputed with an extra forward pass"
        trainer = mode.hf.MoDESFTTrainer(model=model, args=args, train_dataset=task, processing_class=_tokenizer(),
                                         gen_dataset=[{"input_ids": r["input_ids"]} for r in _gen_rows()],
                                         kd_lambda=0.3)
        trainer.train()
    after = _task_loss(model)
    assert after < before - 0.05, (before, after)
    assert sum("kd_loss" in entry for entry in trainer.state.log_history) == 2
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
                    and isinstance(m.__dict__.get("_gradient_checkpointing_func"), RoutedCheckpoint)]
    assert len(checkpointed) >= 2  # both decoder layers ran under checkpointing with their forward's routing
    _check_saved_adapters(trainer, model, tmp_path / "final")


def _chameleon_peft():
    from peft import get_peft_model

    base = tiny_model("chameleon")
    torch.manual_seed(0)  # the same adapters at every call; B random, so the student differs from the teacher
    return get_peft_model(base, peft_config(SPECS["chameleon"], init_lora_weights=False))


def _token_metrics(logits, labels):
    """Gold of TRL's logged entropy and token accuracy: over the scored next-token labels, in float64."""
    logits, labels = logits[:, :-1].double(), labels[:, 1:]
    scored = labels != -100
    p = logits[scored].softmax(-1)
    entropy = -(p * p.log()).nan_to_num().sum(-1)
    return entropy.mean().item(), (logits[scored].argmax(-1) == labels[scored]).double().mean().item()


def test_sft_trainer_logs_the_models_own_loss_with_one_forward_per_batch_on_chameleon(tmp_path):
    """Under TRL's SFTTrainer each step runs three decoder forwards (the task batch, the KD batch's
    teacher and student) and logs loss = the model's own loss (Chameleon's image codes masked) +
    kd_lambda * kd term, each term recomputed here from the adapters the step began with."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from mode.hf.models import decoder_of

    words, boi, eoi = 8200, SPECS["chameleon"].begin_image, SPECS["chameleon"].end_image
    gen = torch.Generator().manual_seed(0)
    task = Dataset.from_list([{"input_ids": [words, words + 1, boi] + torch.randint(4, 20, (4,), generator=gen).tolist()
                               + [eoi, words + 2, words + 3], "labels": [-100] * 8 + [words + 2, words + 3]}
                              for _ in range(8)])  # Chameleon's forward masks the codes' logits: no code is a label
    gen_rows = [{"input_ids": [words + 4, boi] + torch.randint(4, 20, (6,), generator=gen).tolist() + [eoi]}] * 4
    tokenizer = _tokenizer(8224)
    gen_batches, task_batches, decoder_calls, snapshots = [], [], [], []
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            decoder_calls.append(0)

    model = _chameleon_peft()
    decoder_of(model).register_forward_pre_hook(lambda *_: decoder_calls.__setitem__(-1, decoder_calls[-1] + 1))
    model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: task_batches.append({k: kwargs[k] for k in ("input_ids", "attention_mask",
                                                                                 "labels")}), with_kwargs=True)
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, **{**COMMON_ARGS, "learning_rate": 1e-2})
    trainer = mode.hf.MoDESFTTrainer(model=model, args=args, train_dataset=task, processing_class=tokenizer,
                                     gen_dataset=gen_rows, gen_data_collator=lambda rows: gen_batches.append(
                                         collate(rows)) or gen_batches[-1], kd_lambda=0.3, callbacks=[Snapshot()])
    trainer.train()
    assert decoder_calls == [3, 3] and len(task_batches) == 2 and len(gen_batches) == 2

    logs = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    for step, log in enumerate(logs):
        fresh = _chameleon_peft()
        fresh.load_state_dict(snapshots[step], strict=False)
        with torch.no_grad():
            outputs = fresh(**task_batches[step])
            kd = mode.kd_loss(fresh, gen_batches[step]).item()
        assert kd > 0.01
        assert log["kd_loss"] == pytest.approx(kd, rel=1e-5)
        assert log["loss"] == pytest.approx(outputs.loss.item() + 0.3 * kd, rel=1e-5)
        entropy, accuracy = _token_metrics(outputs.logits, task_batches[step]["labels"])
        assert log["entropy"] == pytest.approx(entropy, rel=1e-4) and log["mean_token_accuracy"] == accuracy
    # TRL's own loss (its fused head over the unmasked logits) is another number: the trainer did not use it.
    with torch.no_grad():
        fused = model.get_base_model()(**task_batches[-1], fused_lm_head=True).loss.item()
    assert abs(fused - model.get_base_model()(**task_batches[-1]).loss.item()) > 0.1


def test_a_label_on_a_masked_image_code_is_refused_on_chameleon_and_allowed_elsewhere(tmp_path):
    """Chameleon's forward masks the image codes' logits: a label on one would make the loss infinite (and
    Trainer's logging would filter it), so the first step raises, naming the ids. The same labels on a family
    that masks nothing train."""
    from datasets import Dataset
    from transformers import TrainingArguments

    words = 8200
    rows = [{"input_ids": [words, words + 1, 5, 6], "labels": [-100, words + 1, 5, 6]}] * 4
    args = TrainingArguments(output_dir=str(tmp_path / "chameleon"), **COMMON_ARGS)
    trainer = mode.hf.MoDETrainer(model=_chameleon_peft(), args=args, train_dataset=Dataset.from_list(rows))
    with pytest.raises(ValueError, match=r"labels: ids \[5, 6\] are image codes, whose logits chameleon's forward"):
        trainer.train()
    model = _model("apply_mode")
    small = [{"input_ids": [1, 2, 5, 6], "labels": [-100, 2, 5, 6]}] * 4
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON_ARGS)
    mode.hf.MoDETrainer(model=model, args=args, train_dataset=Dataset.from_list(small)).train()


def test_bad_arguments_raise(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="kd_lambda"):
        mode.hf.MoDETrainer(model=_model("apply_mode"), args=args, kd_lambda=-1)
    with pytest.raises(ValueError, match="has no MoDE layers"):
        mode.hf.MoDETrainer(model=tiny_model(), args=args)
    if not mode.hf.trainer.KD_TAKES_TOPK:
        with pytest.raises(ValueError, match="kd_topk: this version of mode.kd_loss has no topk"):
            mode.hf.MoDETrainer(model=_model("apply_mode"), args=args, kd_topk=256)


@pytest.mark.parametrize("builder", ["apply_mode", "peft"])
def test_resume_from_adapter_checkpoint(builder, tmp_path):
    """A run resumed from step 1's checkpoint (adapters only) ends where the uninterrupted run does."""
    from transformers import TrainingArguments

    def run(output, resume=None):
        model = _model(builder)
        args = TrainingArguments(output_dir=str(output), **{**COMMON_ARGS, "save_strategy": "steps", "save_steps": 1})
        trainer = mode.hf.MoDETrainer(model=model, args=args, train_dataset=_task_rows(), gen_dataset=_gen_rows())
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    assert {p.name for p in (tmp_path / "straight" / "checkpoint-1").iterdir()} >= {"adapter_config.json",
                                                                                  "optimizer.pt"}
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-1"))
    ids = torch.tensor([_task_rows()[0]["input_ids"]])
    straight.eval(), resumed.eval()
    torch.testing.assert_close(resumed(input_ids=ids).logits, straight(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("builder", ["apply_mode", "peft"])
def test_load_best_model_at_end_restores_the_best_checkpoints_adapters(builder, tmp_path):
    from transformers import TrainingArguments

    scores = iter([1.0, 0.0])  # the evaluation after step 1 scores best, so checkpoint-1 is the best model
    args = TrainingArguments(output_dir=str(tmp_path), **{
        **COMMON_ARGS, "save_strategy": "steps", "save_steps": 1, "eval_strategy": "steps", "eval_steps": 1,
        "load_best_model_at_end": True, "metric_for_best_model": "score", "greater_is_better": True})
    model = _model(builder)
    trainer = mode.hf.MoDETrainer(model=model, args=args, train_dataset=_task_rows(), eval_dataset=_task_rows(4),
                                  gen_dataset=_gen_rows(), compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    ids = torch.tensor([_task_rows()[0]["input_ids"]])
    model.eval()
    logits = model(input_ids=ids).logits
    best, last = (mode.load_adapter(tiny_model(), tmp_path / f"checkpoint-{step}") for step in (1, 2))
    torch.testing.assert_close(logits, best(input_ids=ids).logits, rtol=0, atol=0)
    assert not torch.allclose(logits, last(input_ids=ids).logits)  # step 2 moved the adapters: a real restore


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 2 (and 2 generation batches of 2) step like one batch of 4: the KD term is
    scaled like the task loss, which the Trainer normalises over the accumulated batch. SGD (whose
    step is proportional to the gradient) and a large kd_lambda make a mis-scaled KD term visible."""
    from transformers import TrainingArguments

    def two_steps(batch, accumulation):
        model = _model("apply_mode")
        args = TrainingArguments(output_dir=str(tmp_path / str(accumulation)), **{
            **COMMON_ARGS, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
            "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0})
        trainer = mode.hf.MoDETrainer(model=model, args=args, train_dataset=_task_rows(4), gen_dataset=_gen_rows(4),
                                      kd_lambda=1e3)
        trainer.train()
        assert [e["kd_loss"] > 0 for e in trainer.state.log_history if "kd_loss" in e] == [False, True]
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    big, accumulated = two_steps(4, 1), two_steps(2, 2)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kd_topk_reaches_a_kd_loss_that_takes_it(tmp_path, monkeypatch):
    """Once mode.kd_loss takes ``topk``, kd_topk is passed on (checked with a stand-in); None passes nothing."""
    from transformers import TrainingArguments

    seen = []

    def kd_loss_with_topk(model, batch, *, temperature=None, topk=None):
        seen.append((temperature, topk))
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(mode.hf.trainer, "kd_loss", kd_loss_with_topk)
    monkeypatch.setattr(mode.hf.trainer, "KD_TAKES_TOPK", True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2)
    for topk in (256, None):
        trainer = mode.hf.MoDETrainer(model=_model("apply_mode"), args=args, gen_dataset=_gen_rows(),
                                      kd_temperature=3.0, kd_topk=topk)
        trainer.kd_term(trainer.model)
    assert seen == [(3.0, 256), (3.0, None)]


# ----------------------------------------------------------------------------- DDP (torchrun)

def _sgd_steps(output_dir, per_device_batch: int) -> dict:
    """Two SGD steps of MoDETrainer on the task (each row one answer label) with a large KD weight;
    the generation rows are all the same, so every draw of them is the same KD batch whatever the
    process or batch size, and the global step is comparable between world sizes."""
    from transformers import TrainingArguments

    model = _model("apply_mode")
    args = TrainingArguments(output_dir=str(output_dir), **{
        **COMMON_ARGS, "per_device_train_batch_size": per_device_batch, "optim": "sgd", "learning_rate": 0.5,
        "max_grad_norm": 0.0})
    trainer = mode.hf.MoDETrainer(model=model, args=args, train_dataset=_task_rows(8),
                                  gen_dataset=_gen_rows(1) * 4, kd_lambda=1e3)
    trainer.train()
    assert [e["kd_loss"] > 0 for e in trainer.state.log_history if "kd_loss" in e] == [False, True]
    trainer.save_model(str(Path(output_dir) / "final"))
    return {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
            if p.requires_grad}


def _ddp_main(output_dir: str) -> None:
    torch.set_num_threads(1)
    trained = _sgd_steps(output_dir, per_device_batch=2)
    torch.save(trained, Path(output_dir) / f"adapters_rank{os.environ['RANK']}.pt")


def test_ddp_two_processes_step_like_one_process_on_the_global_batch(tmp_path):
    """torchrun, 2 processes x 2 rows: the Trainer wraps the model in DDP, the KD term runs through the
    unwrapped model, and both ranks end with the adapters of one process stepping on batches of 4;
    only the main process saves, adapters only."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), str(root / "tests"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / "ddp" / f"adapters_rank{r}.pt") for r in (0, 1)]
    one = _sgd_steps(tmp_path / "one", per_device_batch=4)
    initial = {n: p for n, p in _model("apply_mode").named_parameters() if p.requires_grad}
    assert max((one[n] - initial[n]).abs().max() for n in one) > 1e-3  # the steps moved the adapters
    for rank in ranks:
        assert rank.keys() == one.keys()
        for name in one:
            torch.testing.assert_close(rank[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    assert {p.name for p in (tmp_path / "ddp" / "final").iterdir()} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}


if __name__ == "__main__":
    _ddp_main(sys.argv[1])


def test_kd_cache_gives_the_teachers_values_and_a_second_trainer_reads_it(tmp_path):
    """kd_cache: the teacher's top k (here the whole 20-code slice) from a file computed at the first KD step;
    the logged KD values are those of the teacher's forward on each batch; a second trainer reads the file."""
    from transformers import TrainingArguments

    logs, caches = {}, []
    for name, kd_cache in (("forward", None), ("cache", tmp_path / "kd"), ("again", tmp_path / "kd")):
        trainer = mode.hf.MoDETrainer(model=_model("apply_mode"), args=TrainingArguments(
            output_dir=str(tmp_path / name), **COMMON_ARGS), train_dataset=_task_rows(), gen_dataset=_gen_rows(),
            kd_cache=kd_cache)
        trainer.train()
        logs[name] = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
        caches.append(trainer._teacher_cache)
    assert caches[0] is None and caches[1].computed and not caches[2].computed
    assert caches[1].path == caches[2].path and caches[1].indices.shape[1] == IMAGE_HI - IMAGE_LO
    assert logs["cache"] == logs["again"]
    # the dense loss against the given-teacher form: the same KL (about 3.5e-5 here) in two roundings
    assert logs["cache"] == pytest.approx(logs["forward"], rel=1e-2, abs=1e-8)
