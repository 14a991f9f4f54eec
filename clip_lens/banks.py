"""Text banks for TextSpan-style analyses: a general bank of short image descriptions, loading, encoding.

The general bank (``"general"``) is written for this project in the spirit of the ~3,500 image
descriptions of Gandelsman et al. (2024): short phrases such as "A striped pattern", "A street in
Lisbon" or "A close-up of a leaf". It is generated from the templates and vocabularies below,
292 texts in each of 12 categories (3,504 in all):

    objects, places, colors, textures, materials, counts,
    art, photography, light_weather, people, text, shapes

Within a category every template gets an equal share (round-robin over its seeded shuffle of
combinations), texts are distinct case-insensitively across the whole bank, 2-9 words, at most
60 characters and plain ASCII. The generated bank ships as ``clip_lens/data/general_bank.txt``;
``python -m clip_lens.banks --write`` regenerates it and ``python -m clip_lens.banks`` prints the
counts per category.

Template fields name a vocabulary in ``VOCAB``; a trailing digit names a second draw from the same
vocabulary (``{color2}``), never equal to the first. "A"/"a" before a vowel becomes "An"/"an", and
the first letter is upper-cased.
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.errors import InputError, close_matches
from clip_lens.files import atomic_write, read_text

PER_CATEGORY = 292
MAX_WORDS = 9
MAX_CHARS = 60

VOCAB: dict[str, list[str]] = {
    # --- objects and animals -----------------------------------------------------------
    "object": [
        "badge", "bicycle", "car", "bus", "train", "airplane", "boat", "chair", "table", "lamp",
        "clock", "guitar", "piano", "violin", "book", "laptop", "phone", "camera", "umbrella",
        "bottle", "cup", "teapot", "vase", "basket", "backpack", "suitcase", "shoe", "hat", "scarf",
        "key", "candle", "mirror", "window", "door", "bridge", "tower", "fountain", "bench",
        "ladder", "bucket", "kite", "ball", "balloon", "tent", "pizza", "cake", "sandwich", "apple",
        "banana", "orange", "lemon", "strawberry", "tomato", "carrot", "mushroom", "leaf", "flower",
        "rose", "sunflower", "tree", "cactus", "rock", "seashell", "feather", "hammer", "pencil",
        "paintbrush", "spoon", "bowl", "kettle", "anchor", "compass", "globe", "telescope",
        "helmet", "crown", "ring", "necklace", "wristwatch", "coin", "envelope", "robot", "tractor",
        "truck", "motorcycle", "skateboard", "surfboard", "rocket", "lighthouse", "windmill",
        "typewriter", "microphone", "teddy bear", "traffic light", "fire hydrant", "mailbox",
    ],
    "object_adj": [
        "small", "large", "tiny", "giant", "old", "broken", "shiny", "vintage", "modern", "dusty",
        "brand new", "abandoned", "toy", "miniature", "handmade", "rusty",
    ],
    "small_object": [
        "cup", "book", "key", "phone", "apple", "candle", "pair of glasses", "wallet", "notebook",
        "coffee mug", "vase of flowers", "remote control", "plate of cookies", "houseplant",
    ],
    "surface": ["table", "desk", "shelf", "bed", "windowsill", "wooden floor", "kitchen counter"],
    "plural": [
        "dogs", "cats", "horses", "cows", "sheep", "birds", "ducks", "fish", "flowers", "trees",
        "cars", "bicycles", "boats", "books", "apples", "oranges", "balloons", "candles", "chairs",
        "bottles", "shoes", "houses", "buildings", "mountains", "clouds", "stars", "umbrellas",
        "butterflies", "penguins", "elephants", "children", "people", "toys", "cups", "coins",
    ],
    "land_animal": [
        "dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "squirrel", "fox", "wolf",
        "bear", "deer", "lion", "tiger", "leopard", "cheetah", "elephant", "giraffe", "zebra",
        "hippo", "rhino", "monkey", "gorilla", "kangaroo", "koala", "panda", "camel", "hedgehog",
        "raccoon", "puppy", "kitten", "frog", "lizard", "tortoise",
    ],
    "land_setting": [
        "in the grass", "in the snow", "on a rock", "at the zoo", "in the wild", "sleeping",
        "running", "eating", "looking at the camera", "in a field", "in the forest", "lying down",
    ],
    "bird": [
        "owl", "eagle", "parrot", "penguin", "flamingo", "pigeon", "swan", "hummingbird", "robin",
        "crow", "seagull", "peacock", "duck", "heron", "woodpecker", "toucan", "sparrow", "hen",
    ],
    "bird_setting": [
        "on a branch", "in flight", "on a fence", "by a lake", "in its nest", "on a rooftop",
        "spreading its wings", "on the beach",
    ],
    "sea_animal": [
        "shark", "dolphin", "whale", "octopus", "jellyfish", "crab", "goldfish", "seal", "sea turtle",
        "starfish", "clownfish", "lobster", "stingray", "seahorse",
    ],
    "sea_setting": [
        "underwater", "in an aquarium", "near a coral reef", "in the ocean", "on the sand",
        "in shallow water", "swimming",
    ],
    # --- places ------------------------------------------------------------------------
    "city": [
        "Paris", "London", "New York", "Tokyo", "Rome", "Berlin", "Madrid", "Lisbon", "Amsterdam",
        "Prague", "Vienna", "Istanbul", "Cairo", "Dubai", "Mumbai", "Delhi", "Bangkok", "Singapore",
        "Hong Kong", "Shanghai", "Beijing", "Seoul", "Sydney", "Melbourne", "Rio de Janeiro",
        "Buenos Aires", "Mexico City", "Havana", "Toronto", "Vancouver", "San Francisco",
        "Los Angeles", "Chicago", "Moscow", "Stockholm", "Oslo", "Copenhagen", "Dublin",
        "Edinburgh", "Venice", "Florence", "Athens", "Marrakesh", "Nairobi", "Cape Town", "Lima",
        "Kyoto", "Hanoi", "Jerusalem", "Barcelona",
    ],
    "country": [
        "France", "Italy", "Spain", "Portugal", "Germany", "Greece", "Ireland", "Scotland",
        "Norway", "Iceland", "Sweden", "Finland", "Poland", "Russia", "Turkey", "Egypt", "Morocco",
        "Kenya", "Tanzania", "South Africa", "Nigeria", "India", "Nepal", "China", "Japan",
        "Korea", "Vietnam", "Thailand", "Indonesia", "the Philippines", "Australia", "New Zealand",
        "Canada", "the United States", "Mexico", "Cuba", "Brazil", "Peru", "Argentina", "Chile",
        "Colombia", "Iran", "Mongolia", "Switzerland", "the Netherlands",
    ],
    "indoor": [
        "kitchen", "library", "office", "classroom", "bedroom", "living room", "bathroom",
        "hospital room", "museum hall", "train station", "airport terminal", "supermarket",
        "restaurant", "bar", "gym", "church", "theater", "warehouse", "factory floor", "laboratory",
        "hotel lobby", "waiting room", "garage", "basement", "attic", "concert hall", "cafe",
        "swimming pool", "bookstore", "subway car",
    ],
    "indoor_adj": ["empty", "crowded", "messy", "tidy", "dark", "cozy", "modern", "abandoned", "old"],
    "outdoor": [
        "beach", "desert", "forest", "jungle", "mountain lake", "waterfall", "canyon", "glacier",
        "volcano", "meadow", "vineyard", "rice field", "wheat field", "harbor", "river bank",
        "city street", "alley", "parking lot", "highway", "playground", "park", "garden",
        "cemetery", "market square", "village", "farm", "island", "cliff", "swamp", "cave",
    ],
    "outdoor_adj": [
        "quiet", "crowded", "deserted", "rocky", "sandy", "misty", "lush", "dry", "frozen",
        "remote", "peaceful", "busy",
    ],
    "town_place": [
        "village", "market", "small town", "harbor town", "farm", "train station", "old church",
        "school", "street market", "city park", "fishing village",
    ],
    "building": [
        "factory", "house", "hospital", "school", "castle", "church", "train station", "farmhouse",
        "warehouse", "amusement park", "mall", "power plant", "hotel", "mine", "prison", "mansion",
    ],
    # --- colors ------------------------------------------------------------------------
    "color": [
        "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
        "gray", "beige", "turquoise", "teal", "navy blue", "maroon", "gold", "silver", "lime green",
        "magenta", "crimson", "olive green", "lavender", "cream", "bright red", "dark green",
        "light blue", "pale yellow",
    ],
    "colored_object": [
        "car", "door", "dress", "umbrella", "balloon", "bicycle", "house", "chair", "flower",
        "boat", "mug", "sweater", "wall", "truck", "kite", "scarf", "sofa", "raincoat", "bus",
        "bird", "apple", "fence", "tent", "backpack", "hat", "shoe", "bowl", "lamp",
    ],
    "color_quality": [
        "vibrant", "pastel", "muted", "warm", "cool", "neon", "earthy", "bright", "dark", "faded",
        "saturated", "desaturated", "soft", "bold", "rich", "contrasting", "natural", "autumn",
        "primary", "complementary", "monochrome", "candy", "jewel", "dusty",
    ],
    # --- textures and patterns -----------------------------------------------------------
    "pattern": [
        "striped", "checkered", "polka dot", "floral", "paisley", "zigzag", "herringbone", "plaid",
        "houndstooth", "chevron", "geometric", "honeycomb", "argyle", "camouflage", "leopard print",
        "zebra print", "tartan", "damask", "wavy", "spiral", "dotted", "diamond", "hexagonal",
        "mosaic", "tie-dye", "marbled", "swirling", "repeating", "symmetrical", "random",
    ],
    "texture": [
        "rough", "smooth", "grainy", "fuzzy", "bumpy", "wrinkled", "cracked", "rusty", "glossy",
        "matte", "porous", "knitted", "woven", "scaly", "furry", "silky", "gritty", "slimy", "spiky",
        "crumpled", "ribbed", "quilted", "frosted", "weathered", "mossy", "sandy",
    ],
    "textile_item": ["shirt", "blanket", "scarf", "dress", "tie", "rug", "curtain", "sock", "pillow"],
    "texture_surface": [
        "tree bark", "sand", "moss", "peeling paint", "cracked mud", "rusty metal", "wet stone",
        "frost on glass", "fur", "snake skin", "a leaf", "a brick wall", "woven fabric", "crumpled paper",
        "tire tracks", "waves on water", "coral", "lichen", "dried paint", "salt crystals",
    ],
    "motif": ["flower", "star", "leaf", "heart", "diamond", "circle", "triangle", "wave", "dot", "square"],
    "two_color_pattern": [
        "striped", "checkered", "polka dot", "zigzag", "plaid", "chevron", "houndstooth", "argyle",
        "diamond", "spiral", "wavy", "dotted",
    ],
    "pattern_color": ["black and white", "red and white", "blue and white", "black and gold", "green and yellow"],
    # --- materials ---------------------------------------------------------------------
    "material_adj": [
        "wooden", "metal", "glass", "plastic", "ceramic", "stone", "marble", "leather", "paper",
        "cardboard", "wool", "cotton", "silk", "concrete", "steel", "copper", "bronze", "golden",
        "rubber", "bamboo", "wicker", "porcelain", "clay", "iron", "velvet", "crystal", "granite",
        "brass", "felt", "straw",
    ],
    "material_object": [
        "cup", "bowl", "vase", "chair", "table", "box", "statue", "spoon", "bench", "bottle",
        "lamp", "door", "bracelet", "figurine", "mask", "bucket", "plate", "sculpture", "bird",
        "horse", "toy", "basket",
    ],
    "material": [
        "wood", "metal", "glass", "plastic", "stone", "marble", "leather", "paper", "cardboard",
        "wool", "silk", "concrete", "brick", "steel", "copper", "bronze", "gold", "rubber", "bamboo",
        "ice", "clay", "sand", "granite", "lace", "denim", "cork", "aluminum foil", "velvet", "fur",
        "straw",
    ],
    "material_pile": [
        "wood", "bricks", "sand", "gravel", "scrap metal", "paper", "fabric", "glass shards",
        "stones", "tires", "plastic bottles", "cardboard boxes", "logs", "coal", "salt",
    ],
    "material_sheet": ["metal", "paper", "glass", "plywood", "ice", "plastic", "fabric", "gold leaf"],
    "building_material": ["brick", "stone", "wood", "glass", "concrete", "steel", "mud", "straw", "ice", "bamboo"],
    "structure": ["house", "wall", "bridge", "tower", "hut", "church", "fence", "staircase"],
    # --- counts and numbers ------------------------------------------------------------
    "count": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "a dozen"],
    "vague_count": ["many", "a few", "several", "lots of", "hundreds of", "countless", "only two", "a pair of"],
    "number": [str(n) for n in [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13, 20, 21, 42, 50, 99, 100, 365, 1000, 2024]],
    "person_group": ["people", "friends", "children", "soldiers", "dancers", "runners", "students", "workers"],
    "collection": [
        "A herd of cows", "A flock of sheep", "A school of fish", "A pack of wolves", "A swarm of bees",
        "A pile of books", "A stack of plates", "A row of houses", "A bunch of grapes",
        "A bouquet of roses", "A crowd of people", "A line of cars", "A fleet of ships",
        "A colony of ants", "A litter of puppies", "A set of keys", "A deck of cards",
        "A basket of eggs", "A string of lights", "A box of chocolates", "A row of bicycles",
        "A pride of lions", "A family of ducks", "A team of players", "A choir of singers",
        "A parade of people", "A queue of people", "A grid of windows", "A cluster of stars",
        "A column of soldiers",
    ],
    "numbered_thing": ["sign", "jersey", "door", "license plate", "ticket", "bus", "race car", "mailbox"],
    # --- art styles and media -----------------------------------------------------------
    "art_style": [
        "impressionist", "cubist", "surrealist", "abstract", "realist", "expressionist", "baroque",
        "renaissance", "pop art", "minimalist", "art nouveau", "art deco", "romantic", "pointillist",
        "fauvist", "folk art", "medieval", "futurist", "naive", "photorealistic",
    ],
    "art_subject": [
        "a cat", "a city", "a woman", "a landscape", "flowers", "the sea", "a ship", "a horse",
        "an old man", "a village", "a forest", "a still life", "a dancer", "a bridge", "a garden",
        "a mountain", "a child", "a bowl of fruit", "a storm", "a king",
    ],
    "medium": [
        "watercolor painting", "oil painting", "pencil sketch", "charcoal drawing", "ink drawing",
        "pastel drawing", "linocut print", "woodcut", "mosaic", "stained glass window", "fresco",
        "mural", "tapestry", "embroidery", "collage", "marble statue", "clay sculpture",
        "crayon drawing", "acrylic painting", "etching", "screen print", "papercut",
    ],
    "artist": [
        "Van Gogh", "Monet", "Picasso", "Dali", "Vermeer", "Rembrandt", "Hokusai", "Klimt",
        "Kandinsky", "Warhol", "Matisse", "Mondrian", "Munch", "Turner", "Cezanne", "Magritte",
        "Frida Kahlo", "Rothko", "Pollock", "Escher", "Caravaggio", "Botticelli", "Hopper",
        "Basquiat", "Seurat",
    ],
    "art_kind": [
        "pixel art", "a 3D render", "a comic book illustration", "an anime drawing", "a cartoon",
        "a child's drawing", "a vector illustration", "concept art", "digital art", "clip art",
        "a doodle", "graffiti", "a low poly model", "a coloring book page", "a children's book illustration",
        "a storyboard", "a tattoo design", "an ink wash painting", "a cave painting", "a sticker",
    ],
    "art_kind_subject": [
        "a castle", "a robot", "a dragon", "a cat", "a spaceship", "a forest", "a city", "a knight",
        "a flower", "a car", "a house", "a tree",
    ],
    # --- photography -------------------------------------------------------------------
    "closeup_subject": [
        "a leaf", "an eye", "a flower", "a hand", "a watch", "an insect", "a coin", "a keyboard",
        "a snowflake", "a feather", "a spider web", "a dewdrop", "a bee", "a face", "fabric",
        "a circuit board", "a seed", "a butterfly wing", "lips", "a mushroom", "a lock", "tree bark",
        "a dog's nose", "a strawberry", "a rose",
    ],
    "aerial_subject": [
        "a city", "a forest", "a coastline", "farmland", "a highway", "a river", "a stadium",
        "a beach", "a harbor", "a desert", "a village", "mountains", "a parking lot", "an island",
        "a crowd", "a glacier", "a golf course", "a volcano", "rooftops", "a train station",
    ],
    "photo_style": [
        "black and white", "long exposure", "macro", "blurry", "overexposed", "underexposed",
        "grainy film", "vintage", "polaroid", "panoramic", "fisheye", "tilt-shift", "infrared",
        "high contrast", "low angle", "wide angle", "sepia", "out of focus", "night vision",
        "slow shutter",
    ],
    "photo_subject": [
        "a street", "a city", "a face", "a car", "a river", "a waterfall", "a crowd", "a dog",
        "a train", "a bridge", "a forest", "traffic", "a beach", "a building", "a kitchen",
    ],
    "shot": [
        "A portrait", "A selfie", "A candid shot", "A wide shot", "A bird's-eye view",
        "A low-angle shot", "A top-down view", "A side view", "A rear view", "A silhouette",
        "A reflection", "A snapshot", "A headshot", "A full-body shot", "An over-the-shoulder shot",
    ],
    "shot_subject": [
        "a man", "a woman", "a child", "a car", "a dog", "a building", "a cyclist", "a tree",
        "a statue", "a runner", "a horse", "a couple",
    ],
    "photo_effect": [
        "shallow depth of field", "bokeh", "lens flare", "motion blur", "a vignette", "film grain",
        "a fisheye lens", "harsh flash", "soft focus", "double exposure", "chromatic aberration",
        "red eye", "dust and scratches", "light leaks", "a watermark", "a timestamp",
        "a dark border", "heavy compression", "a tilted horizon", "a shadow of the photographer",
    ],
    "photo_kind": [
        "A security camera image", "A satellite image", "A screenshot", "A passport photo",
        "An X-ray image", "A thermal image", "A microscope image", "A product photo", "A stock photo",
        "A scanned document", "A webcam image", "A dashcam image", "A drone photo", "A studio photo",
        "A street photo", "A wedding photo", "A family photo", "A food photo", "A real estate photo",
        "A sports photo", "A wildlife photo", "A news photo", "A fashion photo", "A travel photo",
        "A medical scan", "A phone photo", "A film photo", "A photo booth strip", "A blurry snapshot",
        "A mugshot",
    ],
    # --- lighting, time of day and weather ---------------------------------------------
    "lit_place": [
        "a city", "a beach", "a forest", "a street", "a harbor", "a mountain", "a lake", "a desert",
        "a field", "a bridge", "a skyline", "a village", "a road", "a park", "a garden",
    ],
    "time": ["dawn", "sunrise", "noon", "dusk", "sunset", "night", "midnight", "twilight", "golden hour"],
    "weather": ["rain", "snow", "fog", "mist", "storm", "wind", "sunshine", "heat", "drizzle"],
    "weather_adj": [
        "sunny", "rainy", "cloudy", "foggy", "snowy", "windy", "stormy", "misty", "hazy", "frosty",
        "overcast", "clear", "gray", "hot", "cold", "humid",
    ],
    "day_part": ["day", "morning", "afternoon", "evening", "night"],
    "lighting": [
        "soft", "harsh", "dramatic", "neon", "studio", "natural", "warm", "cold", "dim", "bright",
        "low", "moody", "flat", "colorful", "fluorescent", "cinematic", "backstage", "stage", "red",
        "blue",
    ],
    "light_subject": ["a room", "a face", "a street", "a stage", "a table", "a tunnel", "a church", "a bar"],
    "light_source": [
        "candles", "a screen", "a lamp", "a fire", "the moon", "street lights", "a flashlight",
        "neon signs", "a window", "lanterns",
    ],
    "sky_adj": [
        "cloudy", "starry", "orange", "pink", "clear blue", "stormy", "overcast", "dramatic",
        "purple", "hazy", "smoky", "dark",
    ],
    "season": ["Spring", "Summer", "Autumn", "Winter"],
    "season_place": ["the park", "the mountains", "the city", "the countryside", "a forest", "a garden", "the village"],
    # --- people, emotions and actions --------------------------------------------------
    "person": [
        "man", "woman", "boy", "girl", "child", "old man", "old woman", "young man", "young woman",
        "teenager", "couple", "group of friends", "family", "tourist", "student",
    ],
    "action": [
        "running", "walking", "reading", "cooking", "dancing", "singing", "swimming", "laughing",
        "crying", "sleeping", "painting", "playing guitar", "riding a bike", "eating", "drinking coffee",
        "talking on the phone", "writing", "climbing", "jumping", "sitting on a bench", "waving",
        "taking a photo", "hiking", "shopping", "skiing", "hugging", "praying", "fishing",
    ],
    "emotion_adj": [
        "happy", "sad", "angry", "surprised", "scared", "tired", "bored", "excited", "worried",
        "confused", "calm", "proud", "lonely", "nervous", "smiling", "crying", "laughing", "shy",
    ],
    "emotion": [
        "joy", "anger", "fear", "surprise", "sadness", "disgust", "boredom", "pride", "shock",
        "relief", "love", "confusion", "determination", "exhaustion", "embarrassment",
    ],
    "profession": [
        "chef", "doctor", "nurse", "firefighter", "police officer", "soldier", "farmer", "musician",
        "athlete", "teacher", "construction worker", "scientist", "pilot", "astronaut", "fisherman",
        "painter", "judge", "waiter", "mechanic", "ballet dancer",
    ],
    "crowd_action": [
        "dancing", "waiting for a bus", "at a concert", "at a protest", "on a beach", "in a meeting",
        "at a wedding", "in a stadium", "crossing a street", "at a market", "eating together",
        "watching fireworks",
    ],
    "mood": [
        "calm", "nostalgia", "loneliness", "freedom", "joy", "tension", "peace", "mystery", "danger",
        "celebration", "grief", "hope", "chaos", "romance", "adventure",
    ],
    "atmosphere": [
        "cozy", "gloomy", "festive", "peaceful", "tense", "romantic", "eerie", "cheerful",
        "melancholic", "mysterious", "chaotic", "serene", "playful", "solemn",
    ],
    # --- letters, text and words -------------------------------------------------------
    "letter": list(string.ascii_uppercase),
    "lowercase_letter": list(string.ascii_lowercase),
    "word": [
        "love", "hope", "stop", "open", "exit", "sale", "welcome", "danger", "hello", "peace",
        "coffee", "music", "home", "free", "dream", "news", "taxi", "police", "hotel", "pizza",
        "school", "bank", "yes", "no", "help", "cinema", "bakery", "pharmacy", "closed", "push",
    ],
    "sign_word": [
        "stop", "open", "closed", "exit", "sale", "welcome", "danger", "no parking", "hotel", "cafe",
        "keep out", "wet floor", "for rent", "one way", "sold out", "bus stop", "information",
        "entrance", "private", "slow",
    ],
    "language": [
        "Chinese", "Japanese", "Arabic", "Russian", "Hindi", "Korean", "Greek", "Hebrew", "Thai",
        "English", "French", "German", "Spanish", "Italian", "Latin", "Georgian", "Armenian",
        "Tamil", "Bengali", "Amharic",
    ],
    "text_thing": [
        "A handwritten note", "A newspaper page", "A street sign", "A license plate", "A menu",
        "A receipt", "A poster with text", "A book cover", "A logo", "A price tag", "A road sign",
        "A label", "A ticket", "A handwritten letter", "A chalkboard with writing", "A neon sign",
        "A keyboard", "A page of sheet music", "A crossword puzzle", "A magazine cover",
        "A shop sign", "A billboard", "A name tag", "A page of a dictionary", "A comic speech bubble",
        "A birthday card", "A movie poster", "A protest sign", "A warning label", "A barcode",
    ],
    "lettering": [
        "bold", "cursive", "gothic", "serif", "handwritten", "graffiti", "neon", "block", "italic",
        "typewritten", "calligraphic", "3D", "hand-painted", "embossed", "pixelated", "chalk",
    ],
    "text_surface": ["wall", "T-shirt", "mug", "sign", "banner", "book", "cake", "truck"],
    # --- shapes ------------------------------------------------------------------------
    "shape": [
        "circle", "square", "triangle", "rectangle", "oval", "star", "heart", "hexagon", "pentagon",
        "octagon", "diamond", "crescent", "spiral", "cross", "arrow", "cube", "sphere", "cone",
        "cylinder", "pyramid", "ring", "ellipse", "trapezoid", "rhombus", "semicircle",
    ],
    "flat_shape": ["circle", "square", "triangle", "rectangle", "star", "heart", "hexagon", "oval", "diamond"],
    "flat_shapes": ["circles", "squares", "triangles", "rectangles", "stars", "hearts", "hexagons", "dots", "lines"],
    "shape_size": ["small", "large", "tiny", "huge", "thin", "thick", "perfect", "irregular", "hollow", "solid"],
    "shaped": ["heart", "star", "circle", "square", "triangle", "diamond", "moon", "spiral"],
    "shaped_thing": ["cookie", "balloon", "window", "pool", "cloud", "cake", "pillow", "mirror", "rug", "sign"],
    "line_adj": [
        "straight", "curved", "wavy", "parallel", "diagonal", "thin", "thick", "crossing",
        "converging", "broken", "dotted", "dashed", "zigzag", "vertical", "horizontal", "radiating",
    ],
    "arrangement": [
        "in a grid", "in a row", "in a circle", "in a spiral", "scattered randomly", "stacked up", "overlapping",
    ],
}

TEMPLATES: dict[str, list[str]] = {
    "objects": [
        "A {object}", "A photo of a {object}", "A {object_adj} {object}", "An image with {plural}",
        "A {land_animal} {land_setting}", "A {bird} {bird_setting}", "A {sea_animal} {sea_setting}",
        "A {small_object} on a {surface}", "A picture of a {land_animal}",
    ],
    "places": [
        "Photo taken in {city}", "Photo taken in {country}", "A street in {city}",
        "Landscape in {country}", "Traditional architecture in {country}", "Inside a {indoor}",
        "A {indoor_adj} {indoor}", "A {outdoor_adj} {outdoor}", "An abandoned {building}",
        "A {town_place} in {country}",
    ],
    "colors": [
        "A {color} {colored_object}", "{color_quality} colors", "Shades of {color}",
        "A {color} and {color2} image", "A {color} background", "An image dominated by {color}",
        "A {color} object",
    ],
    "textures": [
        "A {pattern} pattern", "A {texture} texture", "A {pattern} {textile_item}",
        "Close-up of {texture_surface}", "A {texture} surface", "A repeating {motif} pattern",
        "A {pattern_color} {two_color_pattern} pattern",
    ],
    "materials": [
        "A {material_adj} {material_object}", "Made of {material}", "A pile of {material_pile}",
        "A sheet of {material_sheet}", "A {structure} made of {building_material}",
        "The texture of {material}", "Something made of {material}",
    ],
    "counts": [
        "An image with {count} {plural}", "{count} {plural}", "A group of {count} {person_group}",
        "{vague_count} {plural}", "The number {number}", "{collection}", "A single {object}",
        "A {numbered_thing} with the number {number}",
    ],
    "art": [
        "{art_style} painting of {art_subject}", "A {medium} of {art_subject}",
        "A painting in the style of {artist}", "{art_kind} of {art_kind_subject}", "{art_kind}",
        "A {art_style} artwork", "A {medium}",
    ],
    "photography": [
        "A close-up of {closeup_subject}", "An aerial view of {aerial_subject}",
        "A {photo_style} photo of {photo_subject}", "{shot} of {shot_subject}", "Photo with {photo_effect}",
        "{photo_kind}", "A {photo_style} photo",
    ],
    "light_weather": [
        "{lit_place} at {time}", "{lit_place} in the {weather}", "A {weather_adj} {day_part}",
        "{lighting} lighting", "{light_subject} lit by {light_source}", "A {sky_adj} sky",
        "{season} in {season_place}",
    ],
    "people": [
        "A {person} {action}", "A {emotion_adj} {person}", "A face showing {emotion}",
        "A portrait of a {profession}", "People {crowd_action}", "A feeling of {mood}",
        "A {atmosphere} atmosphere", "A {profession} at work",
    ],
    "text": [
        "The letter {letter}", 'The word "{word}"', 'A sign that says "{sign_word}"',
        "Text written in {language}", "{text_thing}", "{lettering} lettering",
        "A lowercase letter {lowercase_letter}", 'A {text_surface} with the word "{word}"',
    ],
    "shapes": [
        "A {shape}", "A {color} {shape}", "A {shape_size} {shape}", "A {shaped}-shaped {shaped_thing}",
        "{line_adj} lines", "A {flat_shape} inside a {flat_shape2}", "{flat_shapes} {arrangement}",
        "An object shaped like a {shape}",
    ],
}

CATEGORIES = list(TEMPLATES)
BUILTIN_BANKS = ["general", "shapes", "shapes-attributes"]
GENERAL_BANK_FILE = "general_bank.txt"


# --- generation ------------------------------------------------------------------------
def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _finish(text: str) -> str:
    """'a apple' -> 'an apple', then upper-case the first letter."""
    text = re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)
    return text[0].upper() + text[1:]


def _keep(text: str) -> bool:
    return 2 <= len(text.split()) <= MAX_WORDS and len(text) <= MAX_CHARS and text.isascii()


def expand(template: str) -> list[str]:
    """Every text a template makes from ``VOCAB``, in vocabulary order (kept texts only)."""
    names = _fields(template)
    choices = [VOCAB[name.rstrip("0123456789")] for name in names]
    texts = []
    for values in itertools.product(*choices):
        if len(set(values)) < len(values):  # {color} and {color2} must differ
            continue
        text = _finish(template.format(**dict(zip(names, values))))
        if _keep(text):
            texts.append(text)
    return texts


def _round_robin(pools: list[list[str]], n: int, taken: set[str]) -> list[str]:
    """Up to ``n`` texts, one from each pool in turn, skipping texts in ``taken`` (lower-cased)."""
    chosen: list[str] = []
    iterators = [iter(pool) for pool in pools]
    while iterators and len(chosen) < n:
        for it in list(iterators):
            text = next((t for t in it if t.lower() not in taken), None)
            if text is None:
                iterators.remove(it)
                continue
            taken.add(text.lower())
            chosen.append(text)
            if len(chosen) == n:
                break
    return chosen


def bank_categories(seed: int = 0, per_category: int = PER_CATEGORY) -> dict[str, list[str]]:
    """The general bank by category: ``{category: sorted texts}``, ``per_category`` texts each.

    Each template's texts are shuffled with ``random.Random(f"{category}:{seed}")`` (so editing one
    category leaves the others unchanged) and the templates take turns; a text already chosen by an
    earlier category (case-insensitively) is skipped.
    """
    taken: set[str] = set()
    banks = {}
    for category in CATEGORIES:
        rng = random.Random(f"{category}:{seed}")
        pools = []
        for template in TEMPLATES[category]:
            pool = expand(template)
            rng.shuffle(pool)
            pools.append(pool)
        banks[category] = sorted(_round_robin(pools, per_category, taken))
    return banks


def generate_general_bank(seed: int = 0) -> list[str]:
    """The general text bank: the categories of `bank_categories` in order (3,504 texts)."""
    return [text for texts in bank_categories(seed).values() for text in texts]


# --- loading ---------------------------------------------------------------------------
@dataclass
class TextBank:
    """A list of texts to describe directions with, and where each came from.

    Attributes:
        name: the builtin name, the file's stem, or ``"list"``.
        texts: the texts, stripped, in source order.
        source: the file path, ``"builtin"`` or ``"list"``.
        report: what loading skipped: ``skipped_empty``, ``skipped_comments`` (files only) and
            ``duplicates_removed`` (``[{"line", "duplicate_of", "text"}]``, with ``dedupe=True``).
        lines: the 1-based line (file) or position (list, builtin) of each text in its source.
    """

    name: str
    texts: list[str]
    source: str
    report: dict[str, Any] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.lines:
            self.lines = list(range(1, len(self.texts) + 1))
        if len(self.lines) != len(self.texts):
            raise InputError(f"TextBank {self.name!r} has {len(self.texts)} texts but {len(self.lines)} line numbers.")

    def __len__(self) -> int:
        return len(self.texts)

    def locate(self, index: int) -> str:
        """Where text ``index`` came from, for messages: 'line 12 of banks/mine.txt' or 'text 12 of bank 'x''."""
        if self.source in ("builtin", "list"):
            return f"text {self.lines[index]} of bank {self.name!r}"
        return f"line {self.lines[index]} of {self.source}"


def load_bank(
    spec: Union[str, Path, Sequence[str]], max_chars: int = 200, dedupe: bool = False
) -> TextBank:
    """A validated text bank from a builtin name, a text file or a list of strings.

    Args:
        spec: ``"general"`` (the shipped bank of short image descriptions), ``"shapes"`` (the toy
            world's bank), ``"shapes-attributes"`` (its texts that name one attribute each), a path to a UTF-8 text file with one text per line (whitespace is
            stripped; empty lines and lines starting with ``#`` are skipped and counted), or a
            list of strings.
        max_chars: the longest text allowed, in characters.
        dedupe: keep the first of exact duplicate texts (recorded in ``report``) instead of raising.

    Raises:
        InputError: a missing or non-UTF-8 file, an unknown name, no texts, texts over
            ``max_chars`` or duplicate texts; the message names the lines and the fix.
    """
    if isinstance(spec, (str, Path)):
        if str(spec) == "general":
            data = resources.files("clip_lens").joinpath("data", GENERAL_BANK_FILE).read_text(encoding="utf-8")
            return _validate("general", "builtin", list(enumerate(data.splitlines(), 1)), max_chars, dedupe, "text")
        if str(spec) in ("shapes", "shapes-attributes"):
            from clip_lens.toy.texts import attribute_bank, text_bank

            texts = text_bank() if str(spec) == "shapes" else attribute_bank()
            return _validate(str(spec), "builtin", list(enumerate(texts, 1)), max_chars, dedupe, "text")
        return _load_file(spec, max_chars, dedupe)
    if not isinstance(spec, Sequence) or not all(isinstance(text, str) for text in spec):
        found = type(spec).__name__ if not isinstance(spec, Sequence) else next(
            f"{type(text).__name__} at position {i + 1}" for i, text in enumerate(spec) if not isinstance(text, str)
        )
        raise InputError(
            f"load_bank takes a builtin name ({', '.join(BUILTIN_BANKS)}), a path to a text file or a list of "
            f"strings; got {found}."
        )
    return _validate("list", "list", list(enumerate(spec, 1)), max_chars, dedupe, "item")


def _load_file(spec: Union[str, Path], max_chars: int, dedupe: bool) -> TextBank:
    path = Path(spec)
    if not path.exists():
        if isinstance(spec, str) and path.suffix == "" and len(path.parts) == 1:
            raise InputError(
                f"no bank named {spec!r}; builtins: {', '.join(BUILTIN_BANKS)}; or give a path to a text file."
                + close_matches(spec, BUILTIN_BANKS)
            )
        raise InputError(
            f"text bank file {str(path)!r} does not exist; give the path to a UTF-8 text file with one text "
            f"per line, or a builtin name ({', '.join(BUILTIN_BANKS)})."
        )
    if not path.is_file():
        raise InputError(f"text bank path {str(path)!r} is not a file; give a UTF-8 text file with one text per line.")
    data = read_text(path, "text bank file")
    numbered = []
    comments = 0
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip().startswith("#"):
            comments += 1
        else:
            numbered.append((number, line))
    bank = _validate(path.stem, str(path), numbered, max_chars, dedupe, "line")
    bank.report["skipped_comments"] = comments
    return bank


def _validate(
    name: str, source: str, numbered: list[tuple[int, str]], max_chars: int, dedupe: bool, unit: str
) -> TextBank:
    """Strip, skip empty texts, then check length and duplicates; ``unit`` is 'line', 'item' or 'text'."""
    texts, lines = [], []
    for number, text in numbered:
        if text.strip():
            texts.append(text.strip())
            lines.append(number)
    report: dict[str, Any] = {"skipped_empty": len(numbered) - len(texts)}
    where = f"bank {name!r}" if source in ("builtin", "list") else source
    if not texts:
        raise InputError(
            f"text bank {where} has no texts ({report['skipped_empty']} empty {unit}s); put one text per line."
        )
    too_long = [(n, len(t)) for n, t in zip(lines, texts) if len(t) > max_chars]
    if too_long:
        listed = ", ".join(f"{unit} {n} ({length} chars)" for n, length in too_long[:5])
        raise InputError(
            f"text bank {where} has {len(too_long)} texts longer than max_chars={max_chars}: {listed}"
            f"{' ...' if len(too_long) > 5 else ''}; shorten them or pass a larger max_chars."
        )
    first_seen: dict[str, int] = {}
    duplicates = []
    for n, text in zip(lines, texts):
        if text in first_seen:
            duplicates.append({"line": n, "duplicate_of": first_seen[text], "text": text})
        else:
            first_seen[text] = n
    if duplicates and not dedupe:
        listed = ", ".join(
            f"{unit} {d['line']} repeats {unit} {d['duplicate_of']} ({d['text']!r})" for d in duplicates[:5]
        )
        more = " ..." if len(duplicates) > 5 else ""
        raise InputError(
            f"text bank {where} has {len(duplicates)} duplicate texts: {listed}{more}; "
            "remove them or pass dedupe=True to keep the first of each."
        )
    if duplicates:
        kept = [(n, t) for n, t in zip(lines, texts) if first_seen[t] == n]
        lines, texts = [n for n, _ in kept], [t for _, t in kept]
        report["duplicates_removed"] = duplicates
    return TextBank(name=name, texts=texts, source=source, report=report, lines=lines)


# --- encoding --------------------------------------------------------------------------
def encode_bank(model: Any, bank: TextBank, batch_size: int = 256) -> Float[Tensor, "texts d_embed"]:
    """Unit-norm text embeddings of every text in the bank, in bank order, on the model's device.

    ``model`` needs ``to_tokens(list[str])`` and ``encode_text(tokens, normalize=True)`` (a
    [`HookedCLIP`][clip_lens.HookedCLIP]). A text the tokenizer rejects (too long for its context) raises
    an [`InputError`][clip_lens.InputError] naming its line in the bank.
    """
    chunks = []
    with torch.no_grad():
        for start in range(0, len(bank), batch_size):
            tokens = _tokenize(model, bank, start, bank.texts[start : start + batch_size])
            chunks.append(model.encode_text(tokens, normalize=True))
    return torch.cat(chunks)


def _tokenize(model: Any, bank: TextBank, start: int, batch: list[str]) -> Any:
    try:
        return model.to_tokens(batch)
    except InputError:
        model.to_tokens([""])  # a model-level problem (no tokenizer) raises here, unchanged
        for offset, text in enumerate(batch):
            try:
                model.to_tokens([text])
            except InputError as error:
                raise InputError(
                    f"{bank.locate(start + offset)} cannot be tokenized for this model: {error} "
                    "Shorten or rephrase it, or remove it from the bank."
                ) from error
        raise


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m clip_lens.banks [--write]``: counts per category; ``--write`` regenerates the shipped file."""
    parser = argparse.ArgumentParser(prog="python -m clip_lens.banks", description=main.__doc__)
    parser.add_argument("--write", action="store_true", help=f"regenerate clip_lens/data/{GENERAL_BANK_FILE}")
    args = parser.parse_args(argv)
    categories = bank_categories()
    for category, texts in categories.items():
        print(f"{category:<14} {len(texts):>5}")
    print(f"{'total':<14} {sum(map(len, categories.values())):>5}")
    if args.write:
        path = Path(__file__).parent / "data" / GENERAL_BANK_FILE
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, "\n".join(generate_general_bank()) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
