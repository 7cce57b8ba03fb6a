"""A prompt longer than the model's window leaves beside --max_new_tokens loses its beginning, never
its end: the end is where the answer starts."""

import torch

from dylora_moe.eval.generation import SamplingSettings, generate_completions
from dylora_moe.eval.task import Task


def test_a_prompt_too_long_for_the_window_is_cut_at_its_start(tiny):
    model, tokenizer = tiny
    window = model.config.max_position_embeddings
    max_new = 8
    room = window - max_new
    body = "".join(f"    x{i} = {i} * {i}\n" for i in range(400))
    prompt = f"def squares():\n{body}    return "
    ids = tokenizer(prompt).input_ids
    assert len(ids) > room  # really too long
    task = Task(benchmark="humaneval", task_id="HumanEval/0", prompt=prompt, program_prefix="", tests="",
                stop_sequences=(), reference="", timeout_s=1.0)
    out = generate_completions(model, tokenizer, [task], SamplingSettings(max_new_tokens=max_new, batch_size=1),
                               progress=False)
    assert out.truncated_prompts == 1
    with torch.no_grad():  # what the model says after the last `room` tokens of the prompt
        kept = torch.tensor([ids[-room:]])
        expected = model.generate(kept, attention_mask=torch.ones_like(kept), max_new_tokens=max_new, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert out.completions["HumanEval/0"] == [tokenizer.decode(expected[0, room:], skip_special_tokens=True)]
