"""`nanoserve serve` on the embedded default model, as `make serve` runs it, through the openai client."""
import openai


def test_default_model_answers_chat(default_model_path, start_server):
    server = start_server("smollm2-135m", "--max-model-len", "1024")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in whole.choices[0].message.content
    streamed = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    text = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4,
                                     temperature=0).choices[0].text
    assert "Paris" in text
