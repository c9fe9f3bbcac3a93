"""Caption sets for the tokenizer tests: COCO-style captions and hard, caption-unlike strings.

:func:`coco_style_captions` builds captions from templates (subject, verb, object) with
inserted phrases from every class PTB tokenisation treats specially: abbreviations and acronyms
(inside and at the end), single letters with a period, brackets, ``cannot``/``gonna``, clock
times, numbers, slashes, ``!!``, clitics, quotes, hyphens, dashes, ellipses, stray punctuation,
plus plain captions; in sentence case, upper case or lower case, with irregular spacing.

:func:`hard_strings` glues fragments (URLs, e-mail, emoticons, HTML, symbols...) with and
without spaces: text that captions do not contain, used to measure where the Python tokenizer
still differs from the Java one.
"""

from __future__ import annotations

import random

SUBJECTS = ["a man", "a woman", "two dogs", "a young boy", "the cat", "a group of people",
            "a large white bus", "an elephant", "three giraffes", "a little girl", "people",
            "a train", "a plate of food", "a skateboarder", "the kitchen", "a red fire hydrant",
            "a couple", "several sheep", "a pizza", "a street sign", "a bathroom", "a player"]
VERBS = ["sitting on", "standing next to", "riding", "holding", "walking down", "looking at",
         "parked in front of", "eating", "flying over", "lying on", "playing with", "near",
         "covered in", "with", "on top of", "in", "under", "waiting for"]
OBJECTS = ["a bench", "the street", "a red frisbee", "a wooden table", "the beach", "a field",
           "a surfboard", "the snow", "a tall building", "a laptop", "a large clock", "the water",
           "an umbrella", "a kite", "broccoli", "a tennis racket", "the road", "a white plate"]
PHRASES = [
    # abbreviations and acronyms, inside and at the end; single letters with a period
    "on Main St.", "near St. Mark's church", "at 7 a.m.", "at 5 p.m.", "in the U.S.",
    "with Mr. Smith", "next to Mrs. Jones", "outside Dr. Brown's office", "etc.", "vs.",
    "under a U.S. flag", "in Washington D.C.", "e.g. a cat", "i.e. a dog", "with the No. 5 on it",
    "on 5th Ave.", "Jr.", "by Acme Inc.", "of the Coca-Cola Co.", "from the U.K.", "at 10 A.M.",
    "at noon vs. at night", "cats, dogs, etc.", "at Ph.D. school", "with the letter A.",
    "with the letter B on it", "labeled plan B.", "with vitamin C.", "the letter I.", "Sept.",
    "on Jan. 5", "made by Co. Ltd.", "St.,", "a.m.,",
    # brackets
    "(small)", "(left)", "[x]", "{x}", "(a puppy)", "( big )", "[sic]", "(1)",
    # words split in two
    "who cannot swim", "Cannot", "gonna", "wanna", "gotta", "Gonna", "lemme", "gimme",
    # times and numbers
    "at 12:30", "at 3:45", "at 10:00 pm", "at 3:45pm", "at 12:30.", "3.5", "1,000", "2.5 inch",
    "$3.50", "100%", "2 1/2", "1/2", "\u00bd", "10,000 people", "-5 degrees", "No. 12",
    "number 7", "1990s", "'90s", "5th", "2nd", "a 3-year-old", "2x4", "4x4", "5.,",
    # slashes
    "dog/cat", "black/white", "red/blue/green/white", "and/or", "on/off", "24/7",
    # exclamations and questions
    "yes!!", "wow!", "what?!", "?", "!!!", "really??",
    # clitics and apostrophes
    "don't", "dog's", "they're", "it's", "can't", "won't", "I'm", "we'll", "he'd", "they've",
    "dogs'", "children's", "people's", "o'clock", "dog\u2019s", "don\u2019t", "isn't", "let's",
    "McDonald's", "ma'am", "rock'n'roll", "y'all",
    # quotes
    'a sign that says "STOP"', "a sign reading 'open'", "\u201ccurly\u201d",
    "\u2018single\u2019", 'a "no parking" sign', "the word 'love'", '"Hello"', "''",
    'says "I love you."', "'s'",
    # hyphens and dashes
    "two-story", "x-ray", "T-shirt", "well-known", "hot-dog", "black-and-white", " -- ", " - ",
    "\u2014", "\u2013", "a man\u2014smiling", "---", "-", "--", "half-eaten", "e-mail",
    # ellipses and stray punctuation
    "...", "\u2026", ". . .", "dog...", "....", "..", "a dog.,", ",", ";", ":", "&", "#1", "@",
    "*", "+", "=", "<", ">",
]
SENTENCES = ["It is sunny.", "The sky is blue.", "A dog watches.", "There is a car.",
             "This is fun.", "He smiles.", "Some people watch.", "Many cars pass."]
ENDINGS = ["", ".", ".", ".", " .", "!", "?", "...", ". ", "  ", ".."]


def _caption(rng: random.Random) -> str:
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        parts.insert(rng.randint(0, len(parts)), rng.choice(PHRASES))
    if rng.random() < 0.2:
        parts.append(rng.choice(SENTENCES))
    text = rng.choice([" ", " ", " ", "  "]).join(parts) + rng.choice(ENDINGS)
    style = rng.random()
    if style < 0.7:
        return text[0].upper() + text[1:]
    return text.upper() if style < 0.75 else text


def coco_style_captions(n: int, seed: int) -> list[str]:
    """``n`` captions: a quarter plain ("A man riding a kite."), the rest with phrases."""
    rng = random.Random(seed)
    plain = [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
             for _ in range(n // 4)]
    captions = plain + [_caption(rng) for _ in range(n - n // 4)]
    rng.shuffle(captions)
    return captions


HARD_FRAGMENTS = (
    "a A dog The U.S. U.S a.m. p.m. Mr. Mrs. Dr. St. Jr. Inc. Co. etc. e.g. vs. No. no. fig. "
    "Jan. Calif. cannot Cannot gonna wanna gotta lemme 'tis 'twas don't can't won't it's "
    "I'm we'll they're I'd've y'all o'clock rock'n'roll '90s 'em c'mon 12:30 3:45pm 3.5 "
    "1,000 -5 +3 1/2 \u00bd 10/12/2020 555-1234 2x 100% $3.50 US$5 \u00a35 \u20ac10 #1 "
    "#tag @user a@b.com dog/cat red/blue/green/white and/or well-known anti-war co-op "
    "T-shirt S&P AT&T c++ C# (small) ( ) [big] {x} [ ] { } \" \"quoted\" 'single' `tick` "
    "\u201ccurly\u201d \u2018s\u2019 \u2014 \u2013 - -- --- ... \u2026 ! !! ?! ? . , ; : "
    ":) ;) ^_^ <b> </b> < > << = + * ~ | \\ / _ & &amp; \u00b0 \u00d7 na\u00efve caf\u00e9 "
    "www.google.com http://x.org/a file.jpg I. I II U.K. a.k.a. Ph.D. ca. Ave. Mt. lbs."
).split()


def hard_strings(n: int, seed: int) -> list[str]:
    """``n`` strings of 1-9 fragments glued by a space, two spaces, a tab or nothing."""
    rng = random.Random(seed)
    seps = [" ", " ", " ", "", "  ", "\t"]
    return ["".join(rng.choice(HARD_FRAGMENTS) + rng.choice(seps)
                    for _ in range(rng.randint(1, 9)))
            + rng.choice(["", ".", "!", " ."]) for _ in range(n)]
