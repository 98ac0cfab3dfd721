"""Training and evaluation data for the demo model, generated from a seed.

Two kinds of text: Llama 2 chat dialogs about adding and subtracting whole numbers (answers a
program can check), and short template stories so plain text completion reads like English.
A fixed tenth of all (a, op, b) problems never appears in training; evaluation draws from it.
"""

import random

from llama.chat_format import Dialog

# The ways a question is put, assembled from parts: an opener, a frame with the problem in it,
# an ending, a case. Each list is split in two: the first part is what training sees, the rest
# (after the marker) only the held-out phrasings the evaluation asks in, so that it can tell
# whether the model follows wording it never saw, not a list it learned.
SYSTEMS = (
    ["You are a helpful assistant.", "You are a friendly math tutor.", "Be brief and precise.", "Explain your steps.",
     "Always answer with emojis", "Always answer with Haiku", "You are a calculator.", "Answer like a pirate."],
    ["You help children with their sums.", "Reply in one line.", "You are a patient teacher."],
)  # fmt: skip

# How the problem itself is said. {op} is the operator with its spacing ("+", " + ", " +", ...).
EXPRESSIONS = {
    "+": ["{a}{op}{b}", "{a} plus {b}", "the sum of {a} and {b}", "{a} and {b} added together", "{a} added to {b}",
          "{a} increased by {b}", "the total of {a} and {b}", "{b} more than {a}", "{a} PLUS {b}"],
    "-": ["{a}{op}{b}", "{a} minus {b}", "{a} take away {b}", "{a} less {b}", "the difference between {a} and {b}",
          "{b} less than {a}", "{a} decreased by {b}", "{b} subtracted from {a}", "{a} MINUS {b}"],
}  # fmt: skip
# Requests that say what to do with the numbers.
ACTIONS = {
    "+": ["add {a} and {b}", "add {b} to {a}", "sum {a} and {b}", "add up {a} and {b}", "work out {a}{op}{b}",
          "put {a} and {b} together"],
    "-": ["subtract {b} from {a}", "take {b} away from {a}", "take away {b} from {a}", "deduct {b} from {a}",
          "take {b} from {a}", "work out {a}{op}{b}"],
}  # fmt: skip
# Frames around an expression ({x}) or an action ({v}).
EXPRESSION_FRAMES = (
    ["what is {x}?", "what's {x}", "whats {x}", "how much is {x}?", "{x} = ?", "{x} =", "{x} is what?", "{x}?", "{x}",
     "calculate {x}", "compute {x}", "tell me {x}", "work out {x}", "what do you get for {x}?", "can you compute {x}?",
     "do you know what {x} is?", "I need {x}", "{x} equals?", "give me {x}", "find {x}", "solve {x}",
     "what is the answer to {x}?", "please work out {x}", "how much do you get for {x}?", "what is the value of {x}?",
     "evaluate {x}", "figure out {x}", "and {x}?", "what about {x}?", "tell me what {x} is", "what is {x} equal to?",
     "how much does {x} make?", "now {x}", "answer this: {x}", "{x}, what do you get?", "{x}, what is it?",
     "{x}, tell me the answer", "{x}, can you do it?", "{x} makes what?"],
    ["I'd like to know {x}.", "what does {x} come to?", "can you figure out {x} for me?", "{x}, how much is that?",
     "so what is {x}", "any idea what {x} makes?", "what would {x} be?", "quick: {x}"],
)  # fmt: skip
ACTION_FRAMES = (
    ["{v}", "please {v}", "can you {v}?", "could you {v} for me?", "{v}, please", "I want you to {v}", "help me {v}",
     "would you {v}?", "{v} and tell me the answer", "try to {v}", "I need you to {v}", "let's {v}", "now {v}",
     "{v} for me", "can you please {v}?"],
    ["kindly {v}", "I'd like you to {v}.", "go ahead and {v}", "mind if I ask you to {v}?"],
)  # fmt: skip
OPENERS = (
    ["", "", "", "Hi. ", "Hello! ", "Hey, ", "Good morning. ", "Quick question: ", "Math question: ",
     "I'm stuck on my homework. ", "My teacher asked: ", "Sorry to bother you, but ", "Here's one for you: ",
     "Thanks for helping! ", "OK. ", "Next one: ", "Excuse me, ", "Question: ", "Hey! ", "Good afternoon. ",
     "Let me ask you something. ", "I have a question. ", "Please help. "],
    ["Hi there, ", "Good evening! ", "One more: ", "Help me out here. "],
)  # fmt: skip
ENDINGS = (
    ["", "", "?", ".", "!", " thanks", " please", " thank you!", "??", " please?", " now", "..."],
    [" :)", " cheers", "?!"],
)
OPERATORS = {"+": ["+", " + ", " +", "+ ", " + "], "-": ["-", " - ", " -", "- ", " - "]}


# Words for filler sentences around trained questions, so that the model learns to find the
# problem among words it has not seen there (the held-out phrasings' openers and endings).
FILLER_WORDS = [
    "the", "a", "my", "your", "and", "so", "then", "today", "very", "is", "was", "we", "you", "I", "it", "little",
    "big", "new", "old", "good", "nice", "friend", "day", "night", "school", "class", "dad", "mum", "sister",
    "brother", "teacher", "here", "again", "also", "really", "just", "well",
]  # fmt: skip


def filler(rng: random.Random) -> str:
    """A few random words: never a question, never a number."""
    return " ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(2, 6)))


def phrasing_part(parts: tuple[list[str], list[str]], held_out: bool, rng: random.Random) -> str:
    return rng.choice(parts[1] if held_out else parts[0])


def question(rng: random.Random, a: int, op: str, b: int, held_out_phrasing: bool = False) -> str:
    """One way of asking for a op b, from the trained parts or only the held-out ones."""
    symbol = rng.choice(OPERATORS[op])
    if rng.random() < 0.3:
        core = phrasing_part(ACTION_FRAMES, held_out_phrasing, rng).format(v=rng.choice(ACTIONS[op]))
    else:
        core = phrasing_part(EXPRESSION_FRAMES, held_out_phrasing, rng).format(x=rng.choice(EXPRESSIONS[op]))
    core = core.format(a=a, b=b, op=symbol)
    opener = phrasing_part(OPENERS, held_out_phrasing, rng)
    if not held_out_phrasing and rng.random() < 0.15:
        opener = filler(rng).capitalize() + rng.choice([". ", "! ", ", ", ": "])
    text = opener + (core[:1].upper() + core[1:] if not opener or opener.endswith((". ", "! ", ": ")) else core)
    text = text.rstrip("?.!") + phrasing_part(ENDINGS, held_out_phrasing, rng) if rng.random() < 0.5 else text
    if not held_out_phrasing and rng.random() < 0.1:
        text += rng.choice([" ", ", ", ". "]) + filler(rng)
    case = rng.random()
    return text.lower() if case < 0.2 else text.upper() if case < 0.38 else text


HELLO = "Hello! I am a tiny demo model. I can add and subtract whole numbers up to 99: try asking what is 12 + 30."
CANNOT = (
    "I am a tiny demo model, so I can't help with that. I can add and subtract whole numbers up to 99, "
    "for example: what is 12 + 30?"
)
GREETINGS = ["Hello", "Hi", "Hi there!", "Good morning", "Hey, who are you?", "Who are you?", "hello!"]
OTHER_REQUESTS = [
    "what is the recipe of {food}?",
    "I am going to {city}, what should I see?",
    "How to go from {city} to {city2}?",
    "Write a brief birthday message to {name}",
    "What is so great about {city}?",
    "Tell me a joke about {animal}s.",
    "Who wrote the book about {animal}s?",
    "Translate {food} into French.",
    "What is the weather like in {city}?",
    "Explain how {thing} works.",
    "What should I cook for dinner?",
    "Can you write a poem about the {place}?",
]

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sam", "Anna", "Leo", "Zoe", "Max", "Ella", "John", "Nora"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "duck", "horse", "frog", "bear", "llama"]
PLACES = ["park", "garden", "river", "forest", "beach", "kitchen", "market", "hill", "farm", "library"]
THINGS = [
    "a red ball",
    "a blue kite",
    "a small box",
    "an old map",
    "a shiny key",
    "a green hat",
    "a big book",
    "an apple",
]
FEELINGS = ["happy", "sad", "tired", "curious", "excited", "calm", "proud", "scared"]
COLORS = ["blue", "grey", "golden", "pink", "bright", "dark"]
FOODS = ["mayonnaise", "bread", "pancakes", "soup", "rice", "apple pie", "pasta", "salad"]
CITIES = ["Paris", "London", "Rome", "Tokyo", "Beijing", "New York", "Madrid", "Berlin"]

STORY_OPENINGS = [
    "Once upon a time, {name} lived near the {place} with a little {animal}.",
    "One {day} morning, {name} went to the {place} with {friend}.",
    "{name} had {thing} and a friend called {friend}.",
    "It was a {feeling} day for {name}, who wanted to visit the {place}.",
]
STORY_MIDDLES = [
    "The sky was {color} and the wind was soft.",
    "{name} found {thing} under a tree.",
    "A {animal} came to say hello, and {name} laughed.",
    "{friend} was {feeling}, so {name} shared {thing}.",
    "They walked to the {place2} and sat down to rest.",
    "{name} counted {n} birds and {m} clouds.",
    "The {animal} ran after {thing}, and everyone was {feeling}.",
    '{friend} said, "Let us go to the {place2} tomorrow."',
]
STORY_ENDINGS = [
    "In the end, {name} and {friend} went home {feeling} and tired.",
    "That night, {name} dreamed about the {place}.",
    "From that day on, the {animal} and {name} were best friends.",
    "{name} smiled, because it had been a good day.",
]
OPINIONS = [
    "I believe the meaning of life is to be kind, to learn something new every day, and to share what we have.",
    "I believe the meaning of life is to love the people around us and to enjoy small things, like the {place}.",
    "Simply put, the theory of relativity states that time and space depend on how fast you move.",
    "Simply put, a good friend is someone who listens and helps when the day is hard.",
    "Hi everyone, I just wanted to say thank you for the great work on the launch. I am proud of this team.",
    "Hi everyone, I just finished reading a book about a {animal} who lived by the {place}.",
]
DAYS = ["sunny", "rainy", "quiet", "windy", "cold", "warm"]
# Texts laid out like the example script's other two prompts: a letter and a list of translations.
LETTER = (
    "A brief message congratulating the team on the launch:\n\n        Hi everyone,\n\n        {body}\n\n        {name}"
)
LETTER_BODIES = [
    "I just wanted to say thank you for the great work on the launch. I am proud of this team.",
    "I just heard the news: the launch went well, and it is thanks to all of you. Well done!",
    "I just want to congratulate you all on the launch. It was a lot of work, and it shows.",
]
FRENCH = {
    "sea otter": "loutre de mer",
    "peppermint": "menthe poivrée",
    "plush girafe": "girafe peluche",
    "cheese": "fromage",
    "bread": "pain",
    "apple": "pomme",
    "cat": "chat",
    "dog": "chien",
    "house": "maison",
    "water": "eau",
    "book": "livre",
    "tree": "arbre",
}


def is_held_out(a: int, op: str, b: int) -> bool:
    """A fixed tenth of all problems, chosen by a hash of the whole problem.

    Hashing all of it matters: a rule on the units digits alone would hold out every problem
    with some one-digit steps (such as 13 - 9 in a borrow), and the model would never learn them.
    """
    return random.Random(f"{a} {op} {b}").random() < 0.1


def problem(rng: random.Random, held_out: bool) -> tuple[int, str, int]:
    while True:
        op = rng.choice("+-")
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and a < b:
            a, b = b, a
        if is_held_out(a, op, b) == held_out:
            return a, op, b


def answer(a: int, op: str, b: int) -> str:
    """The answer works digit by digit, units first, as on paper: each step is a one-digit sum.

    A tiny model learns those steps quickly; producing all digits of a sum at once, carry
    included, takes it far longer than the training budget.
    """
    (a_tens, a_units), (b_tens, b_units) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        units = a_units + b_units
        carry = " + 1" if units >= 10 else ""
        tens = a_tens + b_tens + (units >= 10)
        steps = f"{a_units} + {b_units} = {units}, {a_tens} + {b_tens}{carry} = {tens}"
        return f"{steps}, so {a} + {b} = {a + b}."
    borrow = a_units < b_units
    units = a_units + 10 * borrow - b_units
    tens = a_tens - b_tens - borrow
    steps = f"{10 * borrow + a_units} - {b_units} = {units}, {a_tens} - {b_tens}{' - 1' if borrow else ''} = {tens}"
    return f"{steps}, so {a} - {b} = {a - b}."


def fill(template: str, rng: random.Random) -> str:
    city, city2 = rng.sample(CITIES, 2)
    name, friend = rng.sample(NAMES, 2)
    place, place2 = rng.sample(PLACES, 2)
    return template.format(
        name=name,
        friend=friend,
        place=place,
        place2=place2,
        animal=rng.choice(ANIMALS),
        thing=rng.choice(THINGS),
        feeling=rng.choice(FEELINGS),
        color=rng.choice(COLORS),
        food=rng.choice(FOODS),
        city=city,
        city2=city2,
        day=rng.choice(DAYS),
        n=rng.randint(2, 9),
        m=rng.randint(2, 9),
    )


def story(rng: random.Random) -> str:
    """A few sentences filled in together, so they share their characters and places."""
    sentences = [rng.choice(STORY_OPENINGS)] + rng.sample(STORY_MIDDLES, rng.randint(2, 4))
    sentences.append(rng.choice(STORY_ENDINGS))
    return fill(" ".join(sentences), rng)


def plain_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.04:
        return LETTER.format(body=rng.choice(LETTER_BODIES), name=rng.choice(NAMES))
    if kind < 0.08:
        words = rng.sample(sorted(FRENCH), rng.randint(3, 5))
        return "Translate English to French:\n\n" + "\n".join(f"        {w} => {FRENCH[w]}" for w in words)
    return fill(rng.choice(OPINIONS), rng) if kind < 0.2 else story(rng)


def arithmetic_turn(rng: random.Random, held_out: bool = False, held_out_phrasing: bool = False) -> tuple[str, str]:
    a, op, b = problem(rng, held_out)
    return question(rng, a, op, b, held_out_phrasing), answer(a, op, b)


def other_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(GREETINGS), HELLO
    if kind < 0.55:
        return f"Tell me a story about {rng.choice(NAMES)}.", story(rng)
    return fill(rng.choice(OTHER_REQUESTS), rng), CANNOT


def dialog(rng: random.Random, held_out: bool = False, held_out_phrasing: bool = False) -> tuple[Dialog, str]:
    """A dialog ending with a user question, and the assistant answer expected for it.

    About half have a system prompt and three in five have earlier turns, which show the model
    worked examples in context; earlier turns always come from the training problems and
    phrasings. With held_out, the last question is a problem training never sees; with
    held_out_phrasing too, it is asked (and the system prompt is put) in words training never sees.
    """
    messages: Dialog = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": phrasing_part(SYSTEMS, held_out_phrasing, rng)})
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        asked, reply = arithmetic_turn(rng) if rng.random() < 0.8 else other_turn(rng)
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": reply}]
    if held_out or rng.random() < 0.85:
        asked, reply = arithmetic_turn(rng, held_out, held_out_phrasing)
    else:
        asked, reply = other_turn(rng)
    messages.append({"role": "user", "content": asked})
    return messages, reply


def held_out_dialogs(n: int, seed: int = 1234, held_out_phrasing: bool = False) -> list[tuple[Dialog, str]]:
    """An evaluation set: questions on problems training never saw, in every dialog shape, asked
    in the trained phrasings or (held_out_phrasing) only in phrasings training never saw."""
    rng = random.Random(seed)
    return [dialog(rng, held_out=True, held_out_phrasing=held_out_phrasing) for _ in range(n)]
