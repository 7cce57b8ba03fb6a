import pytest

from dylora_moe.eval.benchmarks import load_tasks
from dylora_moe.eval.during_training import evaluate_during_training
from dylora_moe.eval.generation import SamplingSettings, generate_completions


@pytest.fixture(scope="module")
def tasks():
    return load_tasks("humaneval")[:5]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny, tasks):
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=24, batch_size=5)
    lengths = {len(tokenizer(t.prompt).input_ids) for t in tasks}
    assert len(lengths) > 1  # the batch really needs padding
    batched = generate_completions(model, tokenizer, tasks, settings, progress=False)
    single = generate_completions(model, tokenizer, tasks, SamplingSettings(max_new_tokens=24, batch_size=1),
                                  progress=False)
    assert batched.completions == single.completions
    assert all(len(v) == 1 for v in batched.completions.values())
    assert tokenizer.padding_side == "right"  # restored for whoever uses the tokenizer next
    assert batched.expert_usage is None  # a bare base model has no experts


def test_completions_are_cut_at_stop_sequences_and_sampling_gives_n_each(tiny, tasks):
    model, tokenizer = tiny
    out = generate_completions(model, tokenizer, tasks[:2], SamplingSettings(n=3, temperature=0.8, max_new_tokens=32,
                                                                           batch_size=4), progress=False)
    assert [len(v) for v in out.completions.values()] == [3, 3]
    for completion in (c for v in out.completions.values() for c in v):
        assert not any(s in completion for s in tasks[0].stop_sequences)


def test_a_mixture_reports_which_experts_it_used(mixture_dir, tasks):
    from dylora_moe.model import DyLoRAMoE
    from dylora_moe.model.base import load_tokenizer

    model = DyLoRAMoE.from_pretrained(mixture_dir).eval()
    out = generate_completions(model, load_tokenizer(str(mixture_dir)), tasks[:2],
                               SamplingSettings(max_new_tokens=8), progress=False)
    assert len(out.expert_usage) == 2 and sum(out.expert_usage) == pytest.approx(1.0)


def test_evaluate_during_training_returns_real_pass_at_1(tiny):
    model, tokenizer = tiny
    model.train()
    metrics = evaluate_during_training(model, tokenizer, ["humaneval"], 3, max_new_tokens=16)
    assert model.training  # handed back in the mode it came in
    assert 0.0 <= metrics["eval/humaneval/pass@1"] <= 1.0
    rates = [metrics[f"eval/humaneval/{o}_rate"] for o in ("passed", "failed", "timeout", "memory", "syntax", "crash")]
    assert sum(rates) == pytest.approx(1.0)
    assert metrics["eval/humaneval/pass@1"] == metrics["eval/humaneval/passed_rate"]  # n = 1
    model.eval()


def test_generation_leaves_the_callers_random_state_alone(tiny, tasks):
    import torch

    model, tokenizer = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_completions(model, tokenizer, tasks[:1], SamplingSettings(n=2, temperature=0.8, max_new_tokens=4),
                         progress=False)
    assert torch.equal(torch.rand(3), expected)  # a training run's dropout and data order are unaffected
