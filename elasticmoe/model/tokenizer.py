"""Offline byte-level BPE tokenizer for the embedded tiny models, trained on a built-in English corpus."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: DEFAULT_VOCAB is read by the CLI, which imports no transformers
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <|im_start|>=3, <|im_end|>=4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, IM_START, IM_END)
DEFAULT_VOCAB = 512
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Every morning the baker opens her shop at six o'clock, and the smell of fresh bread fills the street.
She sells loaves, rolls, croissants and small cakes; on Fridays there is also a cherry pie.
In the spring the river rises, the fields turn green, and the farmers plant wheat, barley and corn.
Children walk to school along the old stone bridge, counting the boats that pass underneath.
The weather today is cloudy with a chance of rain in the afternoon. Tomorrow should be sunny and warm.
A light wind will blow from the west, and the temperature will reach about twenty degrees.

Science is the patient study of the natural world. Scientists ask questions, make careful observations,
build models, and test their predictions with experiments. When the data disagree with a theory,
the theory must change. Water boils at one hundred degrees Celsius at sea level and freezes at zero.
Light travels faster than sound, which is why we see lightning before we hear the thunder.
The Earth orbits the Sun once a year, and the Moon orbits the Earth roughly once a month.
Plants use sunlight, water and carbon dioxide to make sugar and release oxygen into the air.

Computers follow instructions written in programming languages such as Python, C, Rust and Go.
A program reads input, processes it, and writes output. Good code is simple, tested and easy to read.
For example, a function that adds two numbers might look like this: def add(a, b): return a + b.
Networks connect machines so that they can share data; a server answers requests sent by clients.
Large language models predict the next token of a text. A mixture of experts routes each token to a
few specialised expert networks, so the model can be very large while each step stays cheap.
The router scores every expert, keeps the top k of them, and mixes their outputs with the weights.

History teaches us how people lived long ago. Ancient cities were built near rivers and the sea,
where trade was easy and food was plentiful. Merchants carried salt, silk, spices and copper across
deserts and mountains. Writing was invented to keep records of harvests, taxes and promises.
Libraries collected books and scrolls, and scholars copied them by hand for hundreds of years.
Later the printing press made books cheaper, and more people learned to read and write.

Q: What is the capital of France?
A: The capital of France is Paris.
Q: How many days are there in a week?
A: There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
Q: Can you help me write a short poem about the sea?
A: Of course! Here is one: The sea is wide, the sea is deep, it sings the sailors off to sleep.
User: Hello! How are you today?
Assistant: I am doing well, thank you for asking. How can I help you?
User: Please explain what a prime number is.
Assistant: A prime number is a whole number greater than one whose only divisors are one and itself,
such as 2, 3, 5, 7, 11 and 13.

Numbers and dates appear everywhere: 1, 2, 3, 10, 42, 100, 256, 1024, 2048, 3.14, 0.5, 99%.
The meeting is on 12 March 2024 at 10:30; the budget is $1,250 and the room holds 40 people.
Recipe for pancakes: mix 200 g of flour, 2 eggs, 300 ml of milk and a pinch of salt. Heat a pan,
pour a thin layer of batter, cook for one minute on each side, and serve with honey or lemon.

Good advice is often short. Listen more than you speak. Sleep well, drink water, and go outside.
Be kind to others, because everyone is fighting a battle you know nothing about.
If at first you do not succeed, try, try again. Practice does not make perfect; it makes progress.
Why did the chicken cross the road? To get to the other side! What do you call a sleeping bull?
A bulldozer. The teacher said: "Please open your books to page seven and read the first chapter."
"Where are my keys?" he asked. "They're on the table, next to your glasses," she replied.

Music fills the hall as the orchestra plays: violins, cellos, flutes, trumpets and drums together.
The painter mixes blue and yellow to make green, then adds a touch of white for the sky.
Football, tennis, swimming and running are popular sports; the final match starts at eight tonight.
Cats sleep for most of the day, while dogs love to play, run and chase balls in the park.
Birds build nests in the trees, and bees visit flowers to collect nectar and make honey.
Mountains are covered with snow in winter; in summer hikers climb them to enjoy the view.
"""


def _train(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE model on CORPUS (deterministic for a given vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tok


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int) -> str:
    """Serialized trained tokenizer, cached per process so repeated model creation is fast."""
    return _train(vocab_size).to_str()


def make_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Return a fresh transformers fast tokenizer (byte-level BPE + ChatML template).

    The trained vocabulary has at most ``vocab_size`` entries (fewer if the corpus runs out of
    merges); ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<|im_start|>``=3, ``<|im_end|>``=4.
    Encoding adds no special tokens by itself; the chat template starts with ``<s>``.
    """
    size = DEFAULT_VOCAB if vocab_size is None else int(vocab_size)
    if size < MIN_VOCAB:
        raise ValueError(f"vocab size must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} specials), got {size}")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(size)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
