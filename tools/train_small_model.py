#!/usr/bin/env python3
"""A small real model of exactly the Qwen3.5-MoE architecture, trained from scratch.

Two steps, deterministic given the seeds:

  prepare (CPU, any machine with `tokenizers`): the corpus is the Python 3.11 standard
  library's modules and packages without their tests (source and docstrings: text that
  exists on a fresh machine, 14 MB), split by file into train (95%) and held-out (5%); a
  byte-level BPE tokenizer of 2048 ids is trained on the train split.

      python3 tools/train_small_model.py prepare --out train-data

  train (one GPU, a few minutes; PyTorch + transformers): a Qwen3_5MoeForCausalLM with 4
  layers (3 Gated DeltaNet + 1 gated attention), hidden 192, 16 experts of width 128 with 4
  routed per token plus a shared expert, trained on 256-token windows with the load-balancing
  loss. Writes an HF checkpoint (bf16), the tokenizer with a ChatML template, the loss curve,
  and the held-out perplexity computed by transformers in float32 (the cross-check of
  `flash-moe eval`: 256-token windows, each scored on its own).

      python3 tools/train_small_model.py train --data train-data --out model --steps 1500

  export (CPU): rewrites the trained checkpoint in the layout of the real Qwen/Qwen3.5
  repos (a qwen3_5_moe config with text_config, weights under model.language_model., fused
  experts), which transformers, mlx-lm and flash-moe all load.

      python3 tools/train_small_model.py export --src model --out model-hf

Chat fine-tune (models/tiny-qwen35moe-chat-4bit): the model above taught to answer in the
Qwen3.5 chat format of tests/fixtures/chat/qwen35_style.jinja, so that end-to-end tests get
real XML tool calls out of a real model.

  chat-data (CPU; transformers renders the template): seeded synthetic conversations, each
  ending in the assistant turn to learn: a get_weather or add tool call (reasoning in
  <think>, then <tool_call><function=...><parameter=...>), the answer after the tool's result,
  or plain chat (greetings and a dozen fixed questions, with and without tools), thinking on
  (80%) or off. The user's wording varies (20 weather phrasings, 11 for add), the replies are
  a fixed function of the request, so greedy decoding has one right answer. Cities are real
  names or invented ones, to teach copying; the held-out set asks only about cities that
  training never names. Each row holds the token ids of the prompt (everything up to and
  including the generation prompt) and of the target (the rest, through <|im_end|>).

      python3 tools/train_small_model.py chat-data --src model --out chat-data

  chat-train (one GPU or the CPU): fine-tunes a checkpoint (all weights, AdamW, cosine, bf16
  autocast, loss on the target tokens only), then scores the held-out conversations: the share
  whose whole target is the argmax at every position under teacher forcing (exactly those
  that greedy decoding reproduces), on the saved bf16 weights and after a simulation of
  mlx-lm's 4-bit quantization. Writes an HF checkpoint whose eos ids are <|im_end|> and
  <|endoftext|>, with the template as chat_template.jinja and greedy generation defaults;
  `export` then gives the Qwen3.5 layout as above.

      python3 tools/train_small_model.py chat-train --base model --data chat-data --out chat

  chat-check (CPU, mlx-lm): scores the quantized MLX model on held-out conversations and
  prints its greedy replies for an unseen city, for that call's result, and for "Hello".

      python3 tools/train_small_model.py chat-check --model models/tiny-qwen35moe-chat-4bit --data chat-data

The exact commands used for the bundled models are in models/README.md.
"""

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

WINDOW = 256
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def prepare(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages"}
    files = sorted(f for f in stdlib.rglob("*.py") if not skip & set(f.relative_to(stdlib).parts))
    rng = random.Random(0)
    held = set(rng.sample(range(len(files)), max(1, len(files) // 20)))
    train = [f.read_text(errors="replace") for i, f in enumerate(files) if i not in held]
    heldout = [f.read_text(errors="replace") for i, f in enumerate(files) if i in held]
    out.mkdir(parents=True, exist_ok=True)
    sep = "\n<|endoftext|>\n"
    (out / "train.txt").write_text(sep.join(train))
    (out / "heldout.txt").write_text(sep.join(heldout))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train, trainer)
    tok.save(str(out / "tokenizer.json"))
    print(f"{len(train)} train files ({sum(map(len, train)) / 1e6:.1f} MB), {len(heldout)} held out "
          f"({sum(map(len, heldout)) / 1e3:.0f} KB)")


def windows(ids, n):
    return [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]


def train(data: Path, out: Path, steps: int, seed: int, batch: int, max_seconds: float):
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    random.seed(seed)
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    train_ids = tok.encode((data / "train.txt").read_text()).ids
    held_ids = tok.encode((data / "heldout.txt").read_text()).ids
    print(f"train tokens {len(train_ids)}, held-out tokens {len(held_ids)}")
    config = Qwen3_5MoeTextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=192, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=48, linear_value_head_dim=48,
        linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
        shared_expert_intermediate_size=256, rms_norm_eps=1e-6, max_position_embeddings=4096,
        tie_word_embeddings=False, router_aux_loss_coef=0.01, output_router_logits=True,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 1.0e6, "partial_rotary_factor": 0.25},
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params / 1e6:.2f}M")
    data_t = torch.tensor(train_ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    log = []
    start = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - WINDOW - 1, (batch,), generator=gen)
        x = torch.stack([data_t[s:s + WINDOW] for s in starts]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        last = step == steps - 1 or time.time() - start > max_seconds
        if step % 25 == 0 or last:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1)})
            print(log[-1], flush=True)
        if last:
            break
    model.eval()
    model.config.output_router_logits = False
    # Held-out perplexity in float32 on the bf16-rounded weights that are saved.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        nll, count = 0.0, 0
        for w in windows(held_ids, WINDOW):
            ids = torch.tensor([w], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(w) - 1
    ppl = math.exp(nll / count)
    print(f"held-out perplexity (transformers, f32): {ppl:.4f} over {count} predictions")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    (out / "train_log.json").write_text(json.dumps({
        "command": f"train --steps {steps} --seed {seed} --batch {batch} --max-seconds {max_seconds}", "parameters": params, "window": WINDOW, "batch": batch,
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids), "heldout_predictions": count,
        "heldout_perplexity_transformers_f32": ppl, "transformers": transformers.__version__,
        "torch": torch.__version__, "log": log}, indent=1))


def export(src: Path, out: Path):
    import shutil
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from make_fixtures import save_vlm_layout

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    save_vlm_layout(model, out, torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "train_log.json"):
        shutil.copy(src / name, out / name)
    for name in ("chat_template.jinja", "generation_config.json"):  # written by chat-train
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["eos_token_id"] = model.config.eos_token_id
    (out / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# Chat fine-tune: Qwen3.5-style conversations with XML tool calls.

CHAT_TEMPLATE_FILE = Path(__file__).resolve().parent.parent / "tests/fixtures/chat/qwen35_style.jinja"

TRAIN_CITIES = """Paris London Berlin Madrid Rome Vienna Prague Warsaw Budapest Amsterdam Brussels Dublin
Oslo Stockholm Helsinki Copenhagen Athens Istanbul Moscow Kyiv Bucharest Sofia Belgrade Zagreb Geneva Zurich
Munich Hamburg Milan Naples Barcelona Seville Porto Lyon Marseille Nice Edinburgh Glasgow Manchester Liverpool
Cardiff Belfast Krakow Gdansk Riga Tallinn Vilnius Minsk Tbilisi Yerevan Baku Ankara Cairo Tunis Algiers Rabat
Casablanca Lagos Accra Dakar Nairobi Addis_Ababa Kampala Kigali Luanda Harare Lusaka Johannesburg Durban Tokyo
Osaka Kyoto Seoul Busan Beijing Shanghai Shenzhen Chengdu Wuhan Taipei Manila Jakarta Bangkok Hanoi Singapore
Mumbai Delhi Chennai Kolkata Karachi Lahore Dhaka Kathmandu Colombo Tehran Baghdad Riyadh Dubai Doha Muscat
Amman Beirut Jerusalem Sydney Melbourne Brisbane Perth Adelaide Auckland Wellington Toronto Montreal Vancouver
Calgary Ottawa Chicago Boston Seattle Denver Dallas Houston Miami Atlanta Phoenix Detroit Portland Austin
New_York Los_Angeles San_Francisco San_Diego Las_Vegas New_Orleans Mexico_City Guadalajara Havana Bogota Lima
Quito Caracas Santiago Buenos_Aires Montevideo Rio_de_Janeiro Sao_Paulo Brasilia La_Paz Asuncion""".split()
# Never seen in training: the held-out set and the checks of the exported model ask about these.
HELDOUT_CITIES = """Lisbon Reykjavik Ulaanbaatar Marrakesh Bordeaux Leipzig Salzburg Bergen Valencia Turin
Florence Cologne Antwerp Kraków Nagoya Sapporo Hangzhou Mandalay Vientiane Tashkent Almaty Windhoek
Mombasa Halifax Winnipeg Memphis Pittsburgh Cleveland Cordoba Medellin Cusco Hobart Darwin Christchurch
Kingston Palermo""".split()
SYLLABLES = "ka ra mo li ven tor sa bel un dor mi ta ro zen pa lu gar nis vo el an ber kos tri fa".split()
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "partly cloudy", "overcast", "stormy",
              "clear", "drizzly", "hazy"]
WEATHER_ASKS = [
    "What's the weather in {c}?", "What is the weather in {c}?", "What's the weather like in {c}?",
    "How is the weather in {c}?", "How's the weather in {c} today?", "Weather in {c}?", "weather in {c}",
    "Tell me the weather in {c}.", "Can you check the weather in {c}?", "Is it raining in {c}?",
    "What is the temperature in {c}?", "How warm is it in {c} right now?", "Please get the weather for {c}.",
    "I'm going to {c}. What's the weather there?", "Look up the current weather in {c}, please.",
    "Do I need an umbrella in {c} today?", "Check {c} weather.", "what's it like outside in {c}?",
    "Give me the weather report for {c}.", "Could you tell me what the weather is in {c}?",
]
ADD_ASKS = [
    "What is {a} plus {b}?", "What's {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "{a}+{b}=?",
    "Please add {a} to {b}.", "What do you get if you add {a} and {b}?", "Calculate the sum of {a} and {b}.",
    "Use the add tool on {a} and {b}.", "How much is {a} plus {b}?", "sum of {a} and {b}?",
]
# (user phrasings, reasoning, answer): plain chat, the same answer with or without tools.
PLAIN = [
    (["Hello", "Hello!", "Hi", "Hi!", "Hi there!", "Hey", "hello", "Good morning!", "Hey there", "Greetings!"],
     "The user greets me. I will greet them back.", "Hello! How can I help you today?"),
    (["Say hello.", "Say hello!", "Please say hello.", "Just say hello."],
     "The user asks me to say hello.", "Hello!"),
    (["How are you?", "How are you doing?", "How's it going?"],
     "The user asks how I am.", "I am fine, thank you! How can I help you today?"),
    (["Who are you?", "What are you?", "What is your name?", "Introduce yourself."],
     "The user asks who I am.", "I am a tiny test model. I can check the weather and add numbers."),
    (["What can you do?", "What are you able to do?", "Help", "What tools do you have?"],
     "The user asks what I can do.", "I can check the weather in a city and add two numbers."),
    (["Thanks!", "Thank you", "Thank you very much.", "thanks", "Great, thanks!"],
     "The user thanks me.", "You're welcome!"),
    (["Say OK.", "Reply with OK.", "Answer with just OK.", "Respond with the word OK."],
     "The user wants me to say OK.", "OK"),
    (["Goodbye", "Bye!", "See you later.", "Bye"],
     "The user says goodbye.", "Goodbye! Have a nice day."),
    (["Tell me a joke.", "Tell me a joke!", "Do you know a joke?"],
     "The user wants a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    (["Count from 1 to 5.", "Count to five.", "Please count from one to five."],
     "The user wants me to count to five.", "1, 2, 3, 4, 5"),
    (["What is the capital of France?", "Capital of France?"],
     "The user asks for the capital of France.", "The capital of France is Paris."),
    (["What is the capital of Japan?", "Capital of Japan?"],
     "The user asks for the capital of Japan.", "The capital of Japan is Tokyo."),
    (["What color is the sky?", "What colour is the sky?"],
     "The user asks about the sky.", "The sky is blue on a clear day."),
]
SYSTEMS = [None, None, "You are a helpful assistant.", "You are a helpful assistant. Be brief.",
           "You are a friendly assistant that can use tools.", "Answer concisely."]


# The definition that chat-check (and the end-to-end tests) use: one of the variants trained on.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def chat_tools(rng: random.Random, need: str):
    """A tool list that holds `need` (get_weather or add), with varied descriptions and order."""
    weather = {"type": "function", "function": {
        "name": "get_weather",
        "description": rng.choice(["Get the current weather in a city.", "Current weather for a city.",
                                   "Returns the weather for the given city.", "Look up the weather."]),
        "parameters": {"type": "object", "properties": {"city": {
            "type": "string", "description": rng.choice(["The city name", "City name, e.g. Paris", "A city"])}},
            "required": ["city"]}}}
    if rng.random() < 0.2:  # an optional parameter the model leaves out
        weather["function"]["parameters"]["properties"]["units"] = {"type": "string", "enum": ["metric", "imperial"]}
    add = {"type": "function", "function": {
        "name": "add", "description": rng.choice(["Add two integers.", "Return a + b.", "Adds two numbers."]),
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}}
    if need == "get_weather":
        tools = [weather] if rng.random() < 0.5 else [weather, add]
    elif need == "add":
        tools = [add] if rng.random() < 0.4 else [weather, add]
    else:
        tools = rng.choice([[weather], [add], [weather, add]])
    return tools if rng.random() < 0.5 else tools[::-1]


def chat_city(rng: random.Random, cities, pieces=None):
    """A city name. For training, 40% are invented (copy, don't memorise); with `pieces` (the
    --names broad data) 75% are: syllables, random letters, or 1 to 3 random alphabetic tokens
    of the vocabulary, so that copying sees token sequences of every kind."""
    if cities is TRAIN_CITIES and pieces is not None:
        r = rng.random()
        if r < 0.25:
            name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        elif r < 0.5:
            name = "".join(rng.choice("eeeeaaaoooiiinnnrrrsssttlldkmbgpvhzuuyjwcfé") for _ in range(rng.randint(3, 10)))
            name = name.capitalize()
        elif r < 0.75:
            name = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 3))).capitalize()
        else:
            return rng.choice(cities).replace("_", " ")
        if name.lower() in {c.replace("_", " ").lower() for c in HELDOUT_CITIES}:
            return rng.choice(cities).replace("_", " ")
        return name if rng.random() < 0.85 else rng.choice(["San ", "Port ", "New ", "Lake ", "Saint-"]) + name
    if cities is TRAIN_CITIES and rng.random() < 0.4:  # invented names: copy, don't memorise
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        return name if rng.random() < 0.85 else rng.choice(["San ", "Port ", "New ", "Lake "]) + name
    return rng.choice(cities).replace("_", " ")


def weather_result(rng: random.Random, city: str):
    cond, temp = rng.choice(CONDITIONS), rng.randint(-15, 38)
    text = rng.choice([f"{cond.capitalize()}, {temp} °C", f"{city}: {temp} °C, {cond}",
                       json.dumps({"city": city, "condition": cond, "temperature_c": temp})])
    return text, f"The weather in {city} is {cond}, {temp} °C."


def chat_example(rng: random.Random, cities, pieces=None):
    """One conversation: (kind, messages up to the last assistant turn, tools, enable_thinking).
    Every reply is a fixed function of the request (only the user's wording varies), so greedy
    decoding has one right answer."""
    think = rng.random() >= 0.2
    system = rng.choice(SYSTEMS)
    messages = [] if system is None else [{"role": "system", "content": system}]
    if rng.random() < 0.15:  # an earlier exchange in the history
        asks, _, answer = rng.choice(PLAIN[:3])
        messages += [{"role": "user", "content": rng.choice(asks)}, {"role": "assistant", "content": answer}]
    r = rng.random()
    if r < 0.55:
        kind, fn = "weather", "get_weather"
        city = chat_city(rng, cities, pieces)
        ask = rng.choice(WEATHER_ASKS).format(c=city)
        args = {"city": city}
        reasoning = f"The user wants the weather in {city}. I will call get_weather."
        result, answer = weather_result(rng, city)
        after = f"I have the weather for {city}. I will answer."
    elif r < 0.78:
        kind, fn = "add", "add"
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        ask = rng.choice(ADD_ASKS).format(a=a, b=b)
        args = {"a": a, "b": b}
        reasoning = f"The user wants {a} + {b}. I will call add."
        result = str(a + b) if rng.random() < 0.7 else json.dumps({"result": a + b})
        answer = f"{a} + {b} = {a + b}."
        after = f"The tool returned {a + b}. I will answer."
    else:
        asks, reasoning, answer = rng.choice(PLAIN)
        tools = chat_tools(rng, "none") if rng.random() < 0.5 else None
        messages.append({"role": "user", "content": rng.choice(asks)})
        messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning if think else ""})
        return "plain", messages, tools, think
    tools = chat_tools(rng, fn)
    call = {"type": "function", "function": {"name": fn, "arguments": args}}
    messages.append({"role": "user", "content": ask})
    if rng.random() < 0.5:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call],
                         "reasoning_content": reasoning if think else ""})
        return kind + "_call", messages, tools, think
    # The call in the history: clients often drop the reasoning and send content null.
    history_call = {"role": "assistant", "content": rng.choice(["", None]), "tool_calls": [call]}
    if think and rng.random() < 0.5:
        history_call["reasoning_content"] = reasoning
    messages += [history_call, {"role": "tool", "content": result},
                 {"role": "assistant", "content": answer, "reasoning_content": after if think else ""}]
    return kind + "_answer", messages, tools, think


def chat_data(src: Path, out: Path, n_train: int, n_heldout: int, seed: int, names: str):
    import gzip

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    template = CHAT_TEMPLATE_FILE.read_text()
    render = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    pieces = None
    if names == "broad":  # alphabetic vocabulary tokens (Ġ marks a leading space)
        pieces = sorted(t.lower() for t in tok.get_vocab() if t.isascii() and t.isalpha() and 2 <= len(t) <= 6)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, n, cities, s in (("train", n_train, TRAIN_CITIES, seed), ("heldout", n_heldout, HELDOUT_CITIES, seed + 1)):
        rng = random.Random(s)
        rows, samples = [], []
        for _ in range(n):
            kind, messages, tools, think = chat_example(rng, cities, pieces)
            kw = dict(tools=tools, tokenize=False, chat_template=template, enable_thinking=think)
            prompt = render.apply_chat_template(messages[:-1], add_generation_prompt=True, **kw)
            full = render.apply_chat_template(messages, **kw)
            assert full.startswith(prompt), (prompt, full)
            # What the model must write after the generation prompt, up to and including <|im_end|>.
            target = full[len(prompt):].removesuffix("\n")
            assert target.endswith("<|im_end|>") and "<|im_end|>" not in target[:-10], target
            rows.append({"kind": kind, "prompt": tok.encode(prompt).ids, "target": tok.encode(target).ids})
            if len(samples) < 12:
                samples.append(f"===== {kind} (thinking {think})\n{prompt}\u2588{target}\n")
        with gzip.open(out / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        (out / f"{split}-samples.txt").write_text("\n".join(samples))
        lengths = [len(r["prompt"]) + len(r["target"]) for r in rows]
        kinds = {}
        for r in rows:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        stats[split] = {"conversations": n, "kinds": kinds, "tokens": sum(lengths), "max_len": max(lengths),
                        "target_tokens": sum(len(r["target"]) for r in rows)}
        print(split, stats[split])
    (out / "stats.json").write_text(json.dumps({"seed": seed, "names": names, "template": str(CHAT_TEMPLATE_FILE.name), **stats}, indent=1))


def read_chat_rows(path: Path):
    import gzip

    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def chat_batch(rows, pad: int):
    import torch

    n = max(len(r["prompt"]) + len(r["target"]) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        seq = r["prompt"] + r["target"]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(r["prompt"]):len(seq)] = torch.tensor(r["target"])
    return ids, labels


def chat_exact(model, rows, device, batch=32):
    """Per kind, the share of conversations whose whole target is the argmax at every step under
    teacher forcing: exactly the ones that greedy decoding reproduces token for token."""
    import torch

    hits, totals = {}, {}
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            ids, labels = chat_batch(chunk, 0)
            ids, labels = ids.to(device), labels.to(device)
            pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
            want = labels[:, 1:]
            ok = ((pred == want) | (want == -100)).all(-1)
            for r, good in zip(chunk, ok.tolist()):
                totals[r["kind"]] = totals.get(r["kind"], 0) + 1
                hits[r["kind"]] = hits.get(r["kind"], 0) + int(good)
    return {k: round(hits[k] / totals[k], 4) for k in sorted(totals)}


def fake_quantize(name, p, group=64):
    """Rounds a weight in place as mlx_lm.convert quantizes it (affine, groups of 64 along the
    input dimension, bf16 scales and biases; 8 bits for the router and the shared-expert gate,
    4 for every other matrix), to see before export whether greedy outputs survive 4 bits."""
    import torch

    if p.dim() != 2 or p.shape[-1] % group or "norm" in name:
        return
    bits = 8 if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else 4
    bins = (1 << bits) - 1
    w = p.float().reshape(-1, group)
    w_max, w_min = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    mask = w_min.abs() > w_max.abs()
    scales = ((w_max - w_min) / bins).clamp_min(1e-7)
    scales = torch.where(mask, scales, -scales)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scales)
    scales = torch.where(q0 != 0, edge / q0, scales)
    biases = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    q = torch.clamp(torch.round((w - biases) / scales), 0, bins)
    p.copy_((q * scales.to(torch.bfloat16).float() + biases.to(torch.bfloat16).float()).reshape(p.shape))


def chat_train(base: Path, data: Path, out: Path, steps: int, seed: int, batch: int, lr: float, max_seconds: float):
    import shutil

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_rows = read_chat_rows(data / "train.jsonl.gz")
    held_rows = read_chat_rows(data / "heldout.jsonl.gz")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, output_router_logits=True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = min(50, steps // 10 + 1)
    log = []
    start = time.time()
    model.train()
    for step in range(steps):
        # Cosine to zero over the steps, or over --max-seconds if that comes first.
        progress = max(step / steps, (time.time() - start) / max_seconds)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        ids, labels = chat_batch(rng.sample(train_rows, batch), 0)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step == steps - 1 or time.time() - start > max_seconds
        if step % 25 == 0 or last:
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": round(opt.param_groups[0]["lr"], 6),
                        "seconds": round(time.time() - start, 1)})
            print(log[-1], flush=True)
        if last:
            break
    train_seconds = time.time() - start
    model.eval()
    model.config.output_router_logits = False
    with torch.no_grad():  # scored on the bf16-rounded weights that are saved
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    exact = chat_exact(model, held_rows, device)
    print(f"held-out exact (greedy = target) by kind: {exact}")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            fake_quantize(name, p)
    exact_q4 = chat_exact(model, held_rows, device)
    print(f"the same after a simulated mlx-lm 4-bit quantization: {exact_q4}")
    model.load_state_dict(saved)
    im_end, eot = 2, 0
    model.config.eos_token_id = [im_end, eot]
    model.generation_config.eos_token_id = [im_end, eot]
    model.generation_config.pad_token_id = eot
    model.generation_config.do_sample = False
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(CHAT_TEMPLATE_FILE, out / "chat_template.jinja")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    data_stats = json.loads((data / "stats.json").read_text())
    (out / "train_log.json").write_text(json.dumps({
        "command": f"chat-train --steps {steps} --seed {seed} --batch {batch} --lr {lr} --max-seconds {max_seconds}",
        "base": json.loads((base / "train_log.json").read_text()), "data": data_stats, "steps_done": log[-1]["step"] + 1,
        "train_seconds": round(train_seconds, 1), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "heldout_exact_bf16_f32": exact, "heldout_exact_simulated_4bit": exact_q4, "transformers": transformers.__version__, "torch": torch.__version__,
        "log": log}, indent=1))


def chat_check(model_dir: Path, data: Path, city: str, limit: int):
    """Checks an MLX (quantized) export with mlx-lm: the held-out exact rate under teacher forcing
    (on `limit` conversations spread over the set: mlx-lm on a CPU takes seconds for each) and
    greedy generations for an unseen city, its tool result, and plain chat."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler
    from transformers import PreTrainedTokenizerFast

    model, tokenizer = load(str(model_dir))
    hits, totals = {}, {}
    rows = read_chat_rows(data / "heldout.jsonl.gz")
    for r in rows[::max(1, len(rows) // limit)][:limit]:
        seq = r["prompt"] + r["target"]
        pred = mx.argmax(model(mx.array([seq]))[0, len(r["prompt"]) - 1:-1], axis=-1).tolist()
        totals[r["kind"]] = totals.get(r["kind"], 0) + 1
        hits[r["kind"]] = hits.get(r["kind"], 0) + int(pred == r["target"])
    exact = {k: round(hits[k] / totals[k], 4) for k in sorted(totals)}
    print(f"held-out exact (greedy = target) by kind: {exact}")
    render = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    template = (model_dir / "chat_template.jinja").read_text()
    tools = [WEATHER_TOOL]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    cases = [
        ("tool call", [{"role": "user", "content": f"What's the weather in {city}?"}], tools, True),
        ("tool result", [{"role": "user", "content": f"What's the weather in {city}?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": "Sunny, 21 °C"}], tools, True),
        ("plain, thinking off", [{"role": "user", "content": "Hello"}], None, False),
    ]
    outputs = {}
    for name, messages, tools_, think in cases:
        prompt = render.apply_chat_template(messages, tools=tools_, add_generation_prompt=True, tokenize=False,
                                            chat_template=template, enable_thinking=think)
        text, finish = "", None
        for resp in stream_generate(model, tokenizer, render.encode(prompt, add_special_tokens=False), max_tokens=200,
                                    sampler=make_sampler(temp=0.0)):
            text += resp.text
            finish = resp.finish_reason
        outputs[name] = text
        print(f"----- {name}: prompt ends {prompt[-40:]!r}\n{text}\n----- finish: {finish}")
    return exact, outputs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("train")
    b.add_argument("--data", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--steps", type=int, default=1500)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--max-seconds", type=float, default=float("inf"), help="stop early after this long")
    c = sub.add_parser("export")
    c.add_argument("--src", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("chat-data")
    d.add_argument("--src", type=Path, required=True, help="a checkpoint dir with the tokenizer.json")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--train", type=int, default=6000)
    d.add_argument("--heldout", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--names", choices=["basic", "broad"], default="broad",
                   help="invented city names: syllables only (basic) or also random letters and tokens")
    e = sub.add_parser("chat-train")
    e.add_argument("--base", type=Path, required=True, help="the train output (bf16 HF checkpoint)")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--steps", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--max-seconds", type=float, default=float("inf"), help="stop early after this long")
    f = sub.add_parser("chat-check")
    f.add_argument("--model", type=Path, required=True, help="an MLX model dir (mlx_lm.convert output)")
    f.add_argument("--data", type=Path, required=True)
    f.add_argument("--city", default="Lisbon", help="a city the training data never names")
    f.add_argument("--limit", type=int, default=30, help="held-out conversations to score")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    elif args.cmd == "export":
        export(args.src, args.out)
    elif args.cmd == "chat-data":
        chat_data(args.src, args.out, args.train, args.heldout, args.seed, args.names)
    elif args.cmd == "chat-train":
        chat_train(args.base, args.data, args.out, args.steps, args.seed, args.batch, args.lr, args.max_seconds)
    elif args.cmd == "chat-check":
        chat_check(args.model, args.data, args.city, args.limit)
    else:
        train(args.data, args.out, args.steps, args.seed, args.batch, args.max_seconds)


if __name__ == "__main__":
    main()
