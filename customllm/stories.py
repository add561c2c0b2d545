"""The built-in corpus: short children's stories written by a seeded grammar, no download needed.

Story `i` is drawn from `random.Random(i)`, so the corpus is the same on every machine and any
story can be made on its own. Each story follows one plot (a hero, something found or lost, a
friend, a problem, what they did, how it ended) with enough choices at every step that a small
model has to learn English word order, agreement and reference rather than memorise text.
The text is part of this project and shares its licence (Apache-2.0).
"""

from __future__ import annotations

import random

N_STORIES = 20_000

# (name, pronoun: "he" | "she", what they are)
HEROES = [
    *((name, "she", "girl") for name in "Lily Mia Anna Sara Lucy Emma Zoe Ella Rose Kim".split()),
    *((name, "he", "boy") for name in "Tom Ben Sam Max Leo Jack Tim Finn Jake Noah".split()),
    ("Spot", "he", "dog"), ("Whiskers", "she", "cat"), ("Hop", "he", "bunny"),
    ("Pip", "she", "bird"), ("Rusty", "he", "fox"), ("Coco", "she", "monkey"),
    ("Bubbles", "he", "fish"), ("Daisy", "she", "cow"), ("Benny", "he", "bear"),
    ("Molly", "she", "duck"), ("Squeak", "he", "mouse"), ("Hazel", "she", "owl"),
]  # fmt: skip
ADJECTIVES = "little kind happy brave curious shy small clever cheerful gentle".split()
# (place, the preposition for being there)
PLACES = [
    ("the park", "in"), ("the forest", "in"), ("the garden", "in"), ("the beach", "on"),
    ("the farm", "on"), ("the river", "by"), ("the hill", "on"), ("the big town", "in"),
    ("the school", "at"), ("the lake", "by"), ("the meadow", "in"), ("the old barn", "in"),
]  # fmt: skip
HOMES = ["in a small house", "in a blue house", "near the woods", "by the sea", "on a farm",
         "in a busy town", "under a big tree", "next to a pond"]  # fmt: skip
ACTIVITIES = [
    "play outside", "run in the grass", "sing songs", "draw pictures", "read books",
    "look at the stars", "build things", "dance in the rain", "help others", "eat apples",
    "climb trees", "splash in puddles",
]  # fmt: skip
THINGS = [
    ("ball", "red"), ("kite", "yellow"), ("box", "blue"), ("key", "shiny"), ("hat", "green"),
    ("boat", "toy"), ("map", "old"), ("shell", "pink"), ("rock", "smooth"), ("flower", "pretty"),
    ("book", "big"), ("bell", "little"), ("cup", "white"), ("star", "gold"), ("stick", "long"),
]  # fmt: skip
SPOTS = ["under a tree", "behind a rock", "in the sand", "near the water", "on the path",
         "in the tall grass", "next to the fence", "under a bush"]  # fmt: skip
FEELINGS = {
    "good": ["happy", "proud", "glad", "warm inside", "full of joy"],
    "bad": ["sad", "worried", "scared", "upset", "lonely"],
}
WEATHER = ["It began to rain", "The wind blew hard", "The sky grew dark", "It started to snow"]
LESSONS = [
    "it is good to share", "friends help each other", "being kind makes everyone happy",
    "you should never give up", "it is good to ask for help", "small things can matter a lot",
    "being brave is not the same as not being scared", "it is better to play together",
]  # fmt: skip


class _Story:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.hero = rng.choice(HEROES)
        self.friend = rng.choice([h for h in HEROES if h[0] != self.hero[0]])
        self.thing, self.color = rng.choice(THINGS)
        self.place, self.at = rng.choice(PLACES)
        self.lines: list[str] = []

    def pick(self, options):
        return self.rng.choice(options)

    def say(self, *options: str) -> None:
        self.lines.append(self.pick(options))


PRONOUNS = {"he": ("He", "him", "his"), "she": ("She", "her", "her")}  # subject, object, possessive


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def story(index: int) -> str:
    """Built-in story number `index` (the same text on every machine)."""
    s = _Story(random.Random(index))
    name, _, kind = s.hero
    he, him, his = PRONOUNS[s.hero[1]]
    friend, _, friend_kind = s.friend
    fhe, _, fhis = PRONOUNS[s.friend[1]]
    adj = s.pick(ADJECTIVES)
    thing = f"{s.color} {s.thing}"
    good, bad = s.pick(FEELINGS["good"]), s.pick(FEELINGS["bad"])
    liked = s.rng.sample(ACTIVITIES, 2)
    s.say(
        f"Once upon a time, there was {_a(adj)} {kind} named {name}.",
        f"{name} was {_a(adj)} {kind} who lived {s.pick(HOMES)}.",
        f"Once there was {_a(adj)} {kind}. {his.capitalize()} name was {name}.",
    )
    s.say(
        f"{he} loved to {s.pick(ACTIVITIES)}.",
        f"Every day, {name} liked to {s.pick(ACTIVITIES)} with {his} mom.",
        f"{he} liked to {liked[0]}, but most of all {he.lower()} liked to {liked[1]}.",
    )
    s.say(
        f"One day, {name} went to {s.place}. There, {he.lower()} found {_a(thing)} "
        f"{s.pick(SPOTS)}.",
        f"One sunny morning {s.at} {s.place}, {name} saw {_a(thing)} {s.pick(SPOTS)}.",
    )
    s.say(
        f'"What a nice {s.thing}!" said {name}. {he} picked it up and smiled.',
        f"{name} looked at the {s.thing} for a long time. It was the best {s.thing} "
        f"{he.lower()} had ever seen.",
    )
    plot = s.rng.randrange(3)
    if plot == 0:  # the friend lost it
        s.say(
            f"Then {name} met {_a(friend_kind)} named {friend}. {friend} was {bad}.",
            f"Soon, {name} saw {_a(friend_kind)} named {friend} sitting alone. {fhe} looked {bad}.",
        )
        s.lines.append(f'"Why are you {bad}?" asked {name}. "I lost my {s.thing}," said {friend}.')
        s.say(
            f"{name} wanted to keep the {s.thing}, but {he.lower()} knew it was not "
            f"{his}. {he} gave it back to {friend}.",
            f'"Is this your {s.thing}?" asked {name}. {friend} nodded, and {name} gave it back.',
        )
        s.say(
            f'{friend} was so happy. {fhe} hugged {name} and said, "Thank you!"',
            f'"Thank you, {name}!" said {friend}. "You are a good friend."',
        )
    elif plot == 1:  # the weather
        s.lines.append(f"{s.pick(WEATHER)}. {name} felt {bad} and did not know what to do.")
        s.say(
            f'Then {_a(friend_kind)} named {friend} came by. "Come with me!" said {friend}.',
            f'Just then, {_a(friend_kind)} named {friend} ran up to {him}. "Follow me," '
            f"{fhe.lower()} said.",
        )
        s.say(
            f"They hid {s.pick(['under a big tree', 'in a little cave', 'in the old barn'])} "
            f"until it was over.",
            f"{friend} took {name} to {fhis} home, where it was warm and dry.",
        )
        s.lines.append(f"{name} showed {friend} the {s.thing}, and they played with it together.")
    else:  # it broke
        s.say(
            f"But when {name} played with the {s.thing}, it fell and broke.",
            f"But the {s.thing} was stuck {s.pick(SPOTS)}, and {name} could not get it out.",
        )
        s.lines.append(f"{name} felt {bad}. {he} started to cry.")
        s.say(
            f'{_a(friend_kind).capitalize()} named {friend} heard {him}. "Do not cry," said {friend}. '
            f'"I can help you."',
            f'Then {friend} came. "What is wrong?" {fhe.lower()} asked. {name} told '
            f"{friend} everything.",
        )
        s.say(
            f"{friend} worked hard, and soon the {s.thing} was as good as new.",
            f"They tried and tried. At last, they fixed the {s.thing} together.",
        )
    s.say(
        f"{name} felt {good}. {he} learned that {s.pick(LESSONS)}.",
        f"From that day on, {name} and {friend} were best friends.",
        f"{name} and {friend} played {s.at} {s.place} until the sun went down. They were {good}.",
    )
    s.say("The end.", "", "")
    return " ".join(line for line in s.lines if line)
