"""Golden renderings of well-known chat templates by `transformers.apply_chat_template`, for
lmstack-core's tests/chat_templates.rs. Run: python3 crates/core/tests/data/make_chat_golden.py
(needs `pip install transformers tokenizers`; CI only reads the JSON)."""
import json
import os

from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))

TEMPLATES = {
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
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
                        "bos_token": "<s>", "eos_token": "</s>", "tools": TOOLS if name == "tools" else None}
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
