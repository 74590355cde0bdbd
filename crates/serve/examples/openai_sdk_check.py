"""Drives a running `serve` through the official OpenAI Python SDK, unchanged, and checks what
each call returns: `python3 crates/serve/examples/openai_sdk_check.py [BASE_URL [API_KEY]]`
(default http://127.0.0.1:8000/v1). Needs `pip install openai`. Exits non-zero on the first
mismatch."""
import json
import sys
import urllib.request

import openai
from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=base, api_key=sys.argv[2] if len(sys.argv) > 2 else "unused", max_retries=0)


def check(what, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + str(detail) if detail else ''}")
    if not ok:
        sys.exit(1)


model = client.models.list().data[0].id
check("models.list", bool(model), model)

a = client.completions.create(model=model, prompt="ROMEO:", max_tokens=20, temperature=0.8, seed=3)
b = client.completions.create(model=model, prompt="ROMEO:", max_tokens=20, temperature=0.8, seed=3)
check("completion with a seed", a.choices[0].text == b.choices[0].text and a.usage.completion_tokens > 0,
      repr(a.choices[0].text))
# The repeated prompt's keys and values came from the prefix cache: all but its last token.
cached = b.usage.prompt_tokens_details.cached_tokens
check("usage.prompt_tokens_details.cached_tokens", cached == b.usage.prompt_tokens - 1, b.usage)

r = client.completions.create(model=model, prompt=["To be", "or not"], max_tokens=5, logprobs=2)
check("list prompt with logprobs", len(r.choices) == 2 and len(r.choices[0].logprobs.top_logprobs[0]) == 2,
      r.choices[0].logprobs.top_logprobs[0])

r = client.completions.create(model=model, prompt="First Citizen:", max_tokens=0, echo=True, logprobs=1)
lps = r.choices[0].logprobs.token_logprobs
check("echo with max_tokens 0 (prompt log-probabilities)",
      r.choices[0].text == "First Citizen:" and lps[0] is None and all(x <= 0 for x in lps[1:]), lps[:4])

parts, usage = [], None
for chunk in client.completions.create(model=model, prompt="KING:", max_tokens=10, stream=True,
                                       stream_options={"include_usage": True}):
    if chunk.choices:
        parts.append(chunk.choices[0].text)
    usage = chunk.usage or usage
check("streamed completion with usage", usage is not None and usage.completion_tokens == 10, repr("".join(parts)))

r = client.chat.completions.create(model=model, max_tokens=20, messages=[
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak."}])
check("chat", r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length"),
      repr(r.choices[0].message.content))

text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=model, max_tokens=10, stream=True, messages=[{"role": "user", "content": "Speak."}]) if c.choices)
check("streamed chat", len(text) > 0, repr(text))

# The token id of "e" from the server's own /tokenize (not an OpenAI endpoint: plain HTTP).
req = urllib.request.Request(base.removesuffix("/v1") + "/tokenize", method="POST",
                             data=json.dumps({"prompt": "e", "add_special_tokens": False}).encode(),
                             headers={"content-type": "application/json",
                                      "authorization": f"Bearer {client.api_key}"})
e_id = json.load(urllib.request.urlopen(req))["tokens"][0]
r = client.chat.completions.create(model=model, max_tokens=6, messages=[{"role": "user", "content": "Speak."}],
                                   logit_bias={str(e_id): 100})
check("chat with logit_bias forcing 'e'", r.choices[0].message.content == "eeeeee", repr(r.choices[0].message.content))
# vLLM's extensions go through the SDK's extra_body: "e" is a stop string, ignored until
# min_tokens; then it ends the output, kept in it by include_stop_str_in_output.
r = client.completions.create(model=model, prompt="ROMEO:", max_tokens=10, logit_bias={str(e_id): 100},
                              stop=["e"], extra_body={"min_tokens": 4, "include_stop_str_in_output": True})
check("min_tokens and include_stop_str_in_output via extra_body",
      r.choices[0].text == "eeee" and r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4,
      repr(r.choices[0].text))

for what, kw, status, param in [
    ("negative temperature", dict(model=model, prompt="x", temperature=-1), 400, "temperature"),
    ("unknown model", dict(model="no-such-model", prompt="x"), 404, "model"),
    ("prompt + max_tokens over the context", dict(model=model, prompt="x" * 60, max_tokens=5000), 400, "max_tokens"),
    ("stop of the wrong type", dict(model=model, prompt="x", stop=5), 400, "stop"),
    ("logit_bias outside [-100, 100]", dict(model=model, prompt="x", logit_bias={"1": 500}), 400, "logit_bias"),
]:
    try:
        client.completions.create(**kw)
        check(what, False, "no error")
    except openai.APIStatusError as e:
        check(f"{what} -> {type(e).__name__}", e.status_code == status and e.body.get("param") == param,
              e.body.get("message"))
print("the OpenAI SDK works unchanged against", base)
