"""Tokenization with the tiny model's ChatML template: sampled tokens verbatim, context masked."""

import pytest

from producer.types import Choice, ChoiceMessage, Trajectory
from trainer_worker.core.tokenize import tokenize_trajectory


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sampled(tokenizer, content, *, eos=True, logprob=-0.5):
    """A choice whose tokens are what the template would write for ``content`` (+ <|im_end|>)."""
    ids = encode(tokenizer, content) + ([tokenizer.convert_tokens_to_ids("<|im_end|>")] if eos else [])
    return Choice(token_ids=ids, logprobs=[logprob] * len(ids), message=ChoiceMessage(content=content))


def trained_spans(tokens):
    """(start, stop) of each run of masked tokens."""
    spans, start = [], None
    for i, m in enumerate(tokens.assistant_mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_sampled_token_ids_are_used_verbatim(tokenizer):
    # Ids the tokenizer would never produce for the message text: they must survive as they are.
    odd = [300, 17, 42, 99]
    choice = Choice(token_ids=odd, logprobs=[-0.1, -0.2, -0.3, -0.4], message=ChoiceMessage(content="yes"))
    [tokens] = tokenize_trajectory(Trajectory([{"role": "user", "content": "hi"}, choice]), tokenizer)
    prompt = encode(tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    im_end_nl = encode(tokenizer, "<|im_end|>\n")
    assert tokens.input_ids == prompt + odd + im_end_nl
    assert tokens.assistant_mask == [False] * len(prompt) + [True] * 4 + [False] * len(im_end_nl)
    # float32, as vLLM computes them and the trainer uses them; 0.0 around the sampled turn.
    assert tokens.sampler_logprobs.tolist() == pytest.approx([0.0] * len(prompt) + [-0.1, -0.2, -0.3, -0.4]
                                                             + [0.0] * len(im_end_nl), rel=1e-7)
    assert tokens.logprobs_known == tokens.assistant_mask


def test_sampled_end_of_turn_is_trained_and_not_repeated(tokenizer):
    messages = [{"role": "system", "content": "Answer with yes, no or maybe."}, {"role": "user", "content": "maybe?"}]
    [tokens] = tokenize_trajectory(Trajectory([*messages, sampled(tokenizer, "no", eos=True)]), tokenizer)
    expected = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "no"}], tokenize=False)
    assert tokens.input_ids == encode(tokenizer, expected)
    start, stop = trained_spans(tokens)[0]
    assert tokenizer.decode(tokens.input_ids[start:stop]) == "no<|im_end|>"
    assert tokenizer.decode(tokens.input_ids[stop:]) == "\n"


def test_multi_turn_with_tool_message_matches_the_template(tokenizer):
    first, second = sampled(tokenizer, "get_weather city"), sampled(tokenizer, "The weather is yes.")
    items = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather today?"},
        first,
        {"role": "tool", "content": "sunny 21"},
        {"role": "user", "content": "Thanks!"},
        second,
        {"role": "user", "content": "this message comes after the last choice"},
    ]
    [tokens] = tokenize_trajectory(Trajectory(items), tokenizer)
    as_messages = [m if isinstance(m, dict) else {"role": "assistant", "content": m.message.content} for m in items[:-1]]
    assert tokens.input_ids == encode(tokenizer, tokenizer.apply_chat_template(as_messages, tokenize=False))
    spans = trained_spans(tokens)
    assert [tokens.input_ids[a:b] for a, b in spans] == [first.token_ids, second.token_ids]
    assert sum(tokens.assistant_mask) == len(first.token_ids) + len(second.token_ids)
    between = tokenizer.decode(tokens.input_ids[spans[0][1] : spans[1][0]])
    assert between == "\n<|im_start|>tool\nsunny 21<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n"


def test_plain_assistant_messages_are_context(tokenizer):
    items = [
        {"role": "user", "content": "yes?"},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": "maybe?"},
        sampled(tokenizer, "yes"),
    ]
    [tokens] = tokenize_trajectory(Trajectory(items), tokenizer)
    assert len(trained_spans(tokens)) == 1
    assert sum(tokens.assistant_mask) == len(items[-1].token_ids)


def test_tools_are_passed_to_the_template(tokenizer):
    tools_template = (
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|im_end|>\n{% endif %}"
        + tokenizer.chat_template
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    original = tokenizer.chat_template
    tokenizer.chat_template = tools_template
    try:
        [tokens] = tokenize_trajectory(
            Trajectory([{"role": "user", "content": "hi"}, sampled(tokenizer, "yes")], tools=tools), tokenizer
        )
    finally:
        tokenizer.chat_template = original
    assert tokenizer.decode(tokens.input_ids).startswith("<|im_start|>system\nget_weather <|im_end|>\n")


def test_missing_logprobs_need_the_flag(tokenizer):
    choice = Choice(token_ids=[40, 41], logprobs=[])
    trajectory = Trajectory([{"role": "user", "content": "hi"}, choice])
    with pytest.raises(ValueError, match="allow_training_without_logprobs"):
        tokenize_trajectory(trajectory, tokenizer)
    [tokens] = tokenize_trajectory(trajectory, tokenizer, allow_missing_logprobs=True)
    assert sum(tokens.assistant_mask) == 2 and not any(tokens.logprobs_known)


def test_token_id_outside_vocabulary_is_rejected(tokenizer):
    trajectory = Trajectory([{"role": "user", "content": "hi"}, Choice(token_ids=[5, 100_000], logprobs=[-1.0, -1.0])])
    with pytest.raises(ValueError, match="token id 100000 is outside the model's vocabulary of 415"):
        tokenize_trajectory(trajectory, tokenizer, vocab_size=415)


def test_sequence_longer_than_the_model_is_rejected(tokenizer):
    trajectory = Trajectory([{"role": "user", "content": "hi"}, Choice(token_ids=[5] * 50, logprobs=[-1.0] * 50)])
    with pytest.raises(ValueError, match="longer|more than the model's 32 positions"):
        tokenize_trajectory(trajectory, tokenizer, max_length=32)


def test_a_message_the_template_cannot_render_is_a_value_error_saying_so(tokenizer):
    # Content a template cannot concatenate (validate_groups refuses it earlier on the producer side).
    trajectory = Trajectory([{"role": "user", "content": {"text": "hi"}}, sampled(tokenizer, "yes")])
    with pytest.raises(ValueError, match="chat template could not render the messages: TypeError"):
        tokenize_trajectory(trajectory, tokenizer)


# ----------------------------------------------------- the sampler's own tokens


def sampler_turn(tokenizer, history, content, *, template=None, temperature=None):
    """A turn as trainq's inference worker returns it: the prompt ids vLLM rendered for ``history``, and the
    sampled ids of ``content`` + <|im_end|>."""
    prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True, chat_template=template)
    choice = sampled(tokenizer, content)
    choice.prompt_token_ids = encode(tokenizer, prompt)
    choice.temperature = temperature
    return choice


def play(tokenizer, contents, *, template=None, temperatures=None):
    """A multi-turn trajectory sampled turn by turn, each prompt rendered from the history as the server does."""
    history = [{"role": "system", "content": "Guess the number."}, {"role": "user", "content": "Go."}]
    items = list(history)
    for turn, content in enumerate(contents):
        temperature = temperatures[turn] if temperatures else None
        choice = sampler_turn(tokenizer, history, content, template=template, temperature=temperature)
        reply = {"role": "user", "content": "higher" if turn % 2 else "lower"}
        items += [choice, reply]
        history += [{"role": "assistant", "content": content}, reply]
    return items


def assert_each_turn_trained_under_its_own_prompt(sequences, choices):
    """Every trained token sits right after the sampler's prompt and the turn's earlier sampled tokens."""
    trained = [(seq, i) for seq in sequences for i, m in enumerate(seq.assistant_mask) if m]
    assert len(trained) == sum(len(c.token_ids) for c in choices)
    for choice in choices:
        found = [seq for seq in sequences
                 if seq.input_ids[: len(choice.prompt_token_ids)] == choice.prompt_token_ids
                 and seq.input_ids[len(choice.prompt_token_ids): len(choice.prompt_token_ids) + len(choice.token_ids)]
                 == choice.token_ids]
        assert found, "a turn was not trained right after its own prompt"


def test_a_turn_is_its_prompt_ids_then_its_sampled_ids(tokenizer):
    choice = sampler_turn(tokenizer, [{"role": "user", "content": "hi"}], "yes", temperature=0.7)

    [tokens] = tokenize_trajectory(Trajectory([{"role": "user", "content": "ignored: the ids rule"}, choice]), tokenizer)

    assert tokens.input_ids == choice.prompt_token_ids + choice.token_ids
    assert tokens.assistant_mask == [False] * len(choice.prompt_token_ids) + [True] * len(choice.token_ids)
    assert tokens.temperatures.tolist() == pytest.approx([1.0] * len(choice.prompt_token_ids)
                                                         + [0.7] * len(choice.token_ids))
    assert tokens.sampler_context


def test_turns_whose_prompts_extend_each_other_train_as_one_sequence(tokenizer):
    items = play(tokenizer, ["50", "25", "37"])
    choices = [item for item in items if isinstance(item, Choice)]

    [tokens] = tokenize_trajectory(Trajectory(items), tokenizer)

    # The last prompt holds the whole game so far; the sampled turns sit in it verbatim.
    last = choices[-1]
    assert tokens.input_ids == last.prompt_token_ids + last.token_ids
    assert [tokens.input_ids[a:b] for a, b in trained_spans(tokens)] == [c.token_ids for c in choices]
    assert_each_turn_trained_under_its_own_prompt([tokens], choices)


# The server's template renders an assistant's earlier turns differently from what it sampled:
# a reasoning block dropped from history, as reasoning models' templates do, or whitespace normalised.
DROPS_REASONING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRIMS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(("template", "contents"), [
    (DROPS_REASONING, ["<think>low</think>50", "<think>lower</think>25", "<think>up</think>37"]),
    (TRIMS, ["  50 ", "25\n", " 37"]),
])
def test_a_template_that_renders_history_differently_splits_the_turns_and_trains_each_under_its_own_prompt(
    tokenizer, template, contents
):
    items = play(tokenizer, contents, template=template, temperatures=[1.0, 0.7, 0.7])
    choices = [item for item in items if isinstance(item, Choice)]

    sequences = tokenize_trajectory(Trajectory(items), tokenizer)

    assert [seq.input_ids for seq in sequences] == [c.prompt_token_ids + c.token_ids for c in choices]
    for seq, choice in zip(sequences, choices, strict=True):
        assert [seq.input_ids[a:b] for a, b in trained_spans(seq)] == [choice.token_ids]
        assert seq.sampler_context
    assert_each_turn_trained_under_its_own_prompt(sequences, choices)
    assert [seq.temperatures[-1] for seq in sequences] == pytest.approx([1.0, 0.7, 0.7])


def test_without_the_samplers_prompt_ids_the_template_renders_and_a_changed_history_splits(tokenizer):
    # The trainer's own template drops reasoning from history, as the server's did above.
    choices = [sampled(tokenizer, c) for c in ("<think>a</think>50", "<think>b</think>25")]
    items = [{"role": "user", "content": "Go."}, choices[0], {"role": "user", "content": "lower"}, choices[1]]
    original = tokenizer.chat_template
    tokenizer.chat_template = DROPS_REASONING
    try:
        sequences = tokenize_trajectory(Trajectory(items), tokenizer)
    finally:
        tokenizer.chat_template = original

    assert len(sequences) == 2
    assert [[seq.input_ids[a:b] for a, b in trained_spans(seq)] for seq in sequences] == [
        [choices[0].token_ids], [choices[1].token_ids]]
    assert not any(seq.sampler_context for seq in sequences)


def test_one_choice_without_prompt_ids_renders_the_whole_trajectory(tokenizer):
    items = play(tokenizer, ["50", "25"])
    items[-2].prompt_token_ids = None  # e.g. a turn sampled elsewhere

    [tokens] = tokenize_trajectory(Trajectory(items[:-1]), tokenizer)

    assert not tokens.sampler_context


def test_prompt_ids_outside_the_vocabulary_are_rejected(tokenizer):
    choice = Choice(token_ids=[5], logprobs=[-1.0], prompt_token_ids=[3, 100_000])
    with pytest.raises(ValueError, match=r"prompt_token_ids: token id 100000 is outside"):
        tokenize_trajectory(Trajectory([choice]), tokenizer, vocab_size=415)
