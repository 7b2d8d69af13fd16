"""A small built-in prompt set for the default job, so it needs nothing from a hub.

Short instructions of the kinds an instruct model is asked; the last HELD_OUT are for evaluation only.
Training also gets prompts made from templates of the same kinds (never a held-out one), so a student
learns the kinds, not 48 answers.
"""

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 plus 7?",
    "Give me a synonym for 'happy'.",
    "What does a thermometer measure?",
    "Translate 'good morning' into Spanish.",
    "How many days are in a week?",
    "What is the opposite of 'cold'?",
    "Name a mammal that lives in the ocean.",
    "What gas do plants take in from the air?",
    "Write one sentence about the sun.",
    "What is the largest planet in our solar system?",
    "List two fruits that are red.",
    "What is water made of?",
    "How many legs does a spider have?",
    "What is the plural of 'mouse'?",
    "Name a tool used to cut paper.",
    "What do bees make?",
    "Give an example of a verb.",
    "What is 9 times 3?",
    "Which season comes after winter?",
    "What is the freezing point of water in Celsius?",
    "Name a musical instrument with strings.",
    "What color do you get by mixing blue and yellow?",
    "Write a short greeting for a friend.",
    "What is the main language spoken in Brazil?",
    "How many minutes are in an hour?",
    "Name one continent.",
    "What is the chemical symbol for gold?",
    "Describe a cat in one sentence.",
    "What is the square root of 81?",
    "Which animal is known as the king of the jungle?",
    "What do you call a baby dog?",
    "Name a vegetable that is orange.",
    "What is the boiling point of water in Celsius?",
    "Give a word that rhymes with 'tree'.",
    "What instrument measures air pressure?",
    "What shape has three sides?",
    "Name a planet closer to the sun than Earth.",
    "What is 100 divided by 4?",
    "Write a one-line tip for staying healthy.",
    "What is the tallest animal?",
    "Name something you can find in a kitchen.",
    "How many hours are in a day?",
    "What is the past tense of 'run'?",
    "What do caterpillars turn into?",
    "Name a country in Asia.",
    "What is the color of a clear sky?",
    # held out
    "What is the capital of Italy?",
    "How many sides does a square have?",
    "Name a bird that cannot fly.",
    "What is 15 minus 6?",
    "Give a synonym for 'big'.",
    "What do cows drink?",
    "Which planet is called the red planet?",
    "Write one sentence about the moon.",
]
HELD_OUT = 8


_TEMPLATES = {
    "What is the capital of {}?": ["Spain", "Germany", "Japan", "Canada", "Egypt", "Greece", "Peru", "Kenya", "Norway",
                                   "India", "Mexico", "Portugal", "Chile", "Sweden", "Australia", "Turkey"],
    "What is {}?": ["7 plus 5", "20 minus 8", "6 times 4", "30 divided by 5", "11 plus 9", "18 minus 7", "3 times 8",
                    "14 plus 6", "50 minus 25", "9 plus 9", "12 minus 4", "5 times 5", "40 divided by 8",
                    "13 minus 5", "8 plus 7", "7 times 6"],
    "Give a synonym for '{}'.": ["small", "fast", "smart", "angry", "quiet", "begin", "easy", "brave", "rich",
                                 "tired", "funny", "strong"],
    "What is the opposite of '{}'?": ["up", "early", "full", "light", "open", "young", "wet", "loud", "soft", "win"],
    "Name {}.": ["a fruit that is yellow", "an animal that lives in the desert", "a sport played with a ball",
                 "a flower", "a type of tree", "an insect", "a city in Europe", "a kind of weather", "a metal",
                 "a farm animal", "a vegetable that grows underground", "a bird that can swim"],
    "How many {}?": ["legs does a dog have", "sides does a triangle have", "wheels does a bicycle have",
                     "months are in a year", "seconds are in a minute", "days are in a year", "sides does a hexagon have",
                     "players are on a soccer team", "legs does an insect have", "strings does a violin have"],
    "Write one sentence about {}.": ["the ocean", "rain", "winter", "a forest", "the stars", "a river", "mountains",
                                     "the wind", "summer", "a library", "trains", "snow"],
    "What do {} eat?": ["rabbits", "pandas", "lions", "birds", "horses", "frogs", "koalas", "sheep"],
    "What color is {}?": ["grass", "a banana", "snow", "a ripe tomato", "coal", "an orange", "the sun", "chocolate"],
}


def templated_prompts() -> list[str]:
    """The template-made training prompts (none of them is held out)."""
    made = [t.format(x) for t, fill in _TEMPLATES.items() for x in fill]
    return [q for q in made if q not in PROMPTS]


def written_prompts() -> list[str]:
    """The 48 written training prompts alone (the speed benchmarks' rows, as measured before templates)."""
    return PROMPTS[:-HELD_OUT]


def train_prompts() -> list[str]:
    return written_prompts() + templated_prompts()


def eval_prompts() -> list[str]:
    return PROMPTS[-HELD_OUT:]
