"""16 concurrent clients are batched together, and each gets its own one-at-a-time greedy completion."""

import threading

from tests.serve.conftest import API_KEY, PROMPTS


def test_sixteen_concurrent_clients_get_their_own_completions(server, loaded, alone):
    import openai

    url, engine = server
    tokenizer = loaded[1]
    max_tokens = [6 + 4 * (i % 4) for i in range(16)]  # rows leave the batch at different steps
    expected = [alone(tokenizer(p).input_ids, m) for p, m in zip(PROMPTS, max_tokens)]
    results, gates, errors = [None] * 16, [None] * 16, []
    start = threading.Barrier(16)

    def call(i):
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
            start.wait()
            if i % 2:  # half of them stream
                chunks = list(client.completions.create(model="mixture", prompt=PROMPTS[i], max_tokens=max_tokens[i],
                                                        temperature=0, stream=True))
                results[i] = "".join(c.choices[0].text for c in chunks)
                gates[i] = chunks[0].choices[0].model_extra["dylora"]["gate"]
            else:
                reply = client.completions.create(model="mixture", prompt=PROMPTS[i], max_tokens=max_tokens[i],
                                                  temperature=0)
                results[i], gates[i] = reply.choices[0].text, reply.model_extra["dylora"]["gate"]
        except Exception as err:  # reported below, with the thread's index
            errors.append((i, err))

    engine.max_rows_seen = 0
    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert results == expected
    assert engine.max_rows_seen > 1, "the requests were not batched together"
    # each was routed from its own prompt: the gate it reports is the one it gets alone
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    for i in (0, 5, 11):
        solo = client.completions.create(model="mixture", prompt=PROMPTS[i], max_tokens=1).model_extra["dylora"]["gate"]
        assert max(abs(a - b) for a, b in zip(solo, gates[i])) < 1e-5
