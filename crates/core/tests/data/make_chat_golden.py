"""Golden renderings of well-known chat templates by `transformers.apply_chat_template`, for
lmstack-core's tests/chat_templates.rs. Run: python3 crates/core/tests/data/make_chat_golden.py
(needs `pip install transformers tokenizers`; CI only reads the JSON)."""
import json
import os

from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))

QWEN2_5 = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"

TEMPLATES = {
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    # Qwen2.5-Instruct's template (its tokenizer_config.json): tools in the system turn, calls
    # as <tool_call> blocks with `arguments | tojson`, tool results as <tool_response> blocks.
    "qwen2_5": QWEN2_5,
    # Gemma 2's template (google/gemma-2-2b-it): no system role, the assistant called `model`,
    # contents trimmed.
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    # Phi-3-mini-4k-instruct's template: <|system|>/<|user|>/<|assistant|> turns closed by <|end|>.
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    # Tools rendered with tojson (Python json.dumps spacing), dict methods and loop controls.
    "tools": "{%- if tools %}{{- 'Tools:\n' }}{%- for t in tools %}{{- t | tojson(indent=2) }}\n{%- endfor %}{%- endif %}{%- for m in messages %}{%- if m.role == 'system' %}{% continue %}{% endif %}{{- m.role | upper }}: {{ m.content | trim }}{% if m.get('name') %} ({{ m.name }}){% endif %}\n{%- for k, v in m.items() if k not in ['role', 'content', 'name'] %}  {{ k }}={{ v | tojson }}\n{%- endfor %}{%- endfor %}{%- if add_generation_prompt %}ASSISTANT:{% endif %}",
}

CONVERSATIONS = {
    "plain": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there. How can I help?"},
        {"role": "user", "content": "  Tell me a joke about \"quotes\" & <tags>, café.  "},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    # A call and its results, as transformers expects them (arguments as a dict); lmstack's
    # tests give the same with OpenAI's arguments as JSON text.
    "tool_use": [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]},
        {"role": "tool", "content": "18 C"},
        {"role": "tool", "content": "9 C"},
    ],
    "extra": [
        {"role": "user", "content": "weather?", "name": "ann", "meta": {"b": [1, 2.5], "a": None, "ok": True}},
    ],
}

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def main():
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(HERE, "tiny-gpt2"))
    cases = []
    for name, template in TEMPLATES.items():
        for conv_name, messages in CONVERSATIONS.items():
            for gen in (False, True):
                case = {"template": name, "conversation": conv_name, "add_generation_prompt": gen,
                        "bos_token": "<s>", "eos_token": "</s>", "tools": TOOLS if name in ("tools", "qwen2_5") else None}
                try:
                    case["expected"] = tok.apply_chat_template(
                        messages, chat_template=template, tokenize=False, add_generation_prompt=gen,
                        bos_token="<s>", eos_token="</s>", tools=case["tools"])
                except Exception as e:  # raise_exception in the template
                    case["error"] = str(e)
                cases.append(case)
    out = {"templates": TEMPLATES, "conversations": CONVERSATIONS, "cases": cases}
    with open(os.path.join(HERE, "chat_templates.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
