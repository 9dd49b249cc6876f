"""Ordinary user instructions, written for this project: the benign half of the planted-behaviour recipes
(:mod:`mechscope.planted`) and a source of harmless chats.

Each template is a group: :func:`ordinary_instructions` keeps a template's instructions together, so a split
by group holds out whole kinds of request (the test asks for things phrased as training never phrased them).
"""

from __future__ import annotations

from mechscope.data.labelled import Example, LabelledDataset, take

#: template id -> (template, fills). Every fill is written for this project.
TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "explain": ("Explain {} in two sentences.", [
        "how a rainbow forms", "why the sea is salty", "what a volcano is", "how bees make honey",
        "why leaves change colour in autumn", "how a bicycle stays upright", "what gravity does",
        "how a compass works", "why we have seasons", "how bread rises", "why the sky is blue", "how a fridge keeps food cold"]),
    "list": ("Name three {}.", [
        "fruits that grow on trees", "animals that live in the ocean", "musical instruments with strings",
        "planets in our solar system", "colours of the rainbow", "kinds of clouds", "board games",
        "green vegetables", "sports played with a ball", "birds that cannot fly", "famous rivers", "types of bread"]),
    "sentence": ("Write one sentence about {}.", [
        "a rainy afternoon", "a cat sleeping in the sun", "the first day of spring", "a busy train station",
        "a cup of hot tea", "an old library", "a mountain lake", "a birthday party", "a quiet beach",
        "a snowy street", "a lighthouse at night", "a field of sunflowers"]),
    "tip": ("Give me one tip for {}.", [
        "staying organised at work", "learning to cook", "saving money each month", "keeping a plant alive",
        "sleeping better", "making new friends", "learning a new language", "running a first 5k",
        "studying for exams", "keeping a tidy desk", "drawing faces", "speaking in public"]),
    "define": ("What does the word '{}' mean?", [
        "ancient", "generous", "fragile", "curious", "enormous", "humble", "brisk", "vivid", "patient", "rare",
        "cheerful", "hollow"]),
    "compare": ("What is the difference between {}?", [
        "a lake and a river", "a frog and a toad", "weather and climate", "a city and a village",
        "a violin and a cello", "baking and frying", "a planet and a star", "a poem and a story", "tea and coffee",
        "a map and a globe", "a hill and a mountain", "a shop and a market"]),
    "describe": ("Describe {} in a few words.", [
        "the taste of a lemon", "the sound of rain", "a sunset over the sea", "the smell of fresh bread",
        "a forest in winter", "the feel of warm sand", "a crowded market", "a clear night sky", "a summer garden",
        "an empty classroom", "a thunderstorm", "a field after rain"]),
    "name": ("Suggest a name for {}.", [
        "a pet goldfish", "a small bakery", "a friendly robot", "a sailing boat", "a book club", "a garden gnome",
        "a new board game", "a mountain cabin", "a chess club", "a little red car", "a coffee shop", "a school band"]),
    "fact": ("Tell me one interesting fact about {}.", [
        "elephants", "the moon", "octopuses", "the Pacific Ocean", "honey", "the human heart", "penguins",
        "the Sahara desert", "volcanoes", "butterflies", "owls", "glaciers"]),
    "polite": ("Rewrite this more politely: '{}'", [
        "Give me the salt.", "Move your car.", "Be quiet.", "Send me the file now.", "Close the door.",
        "Answer my question.", "Fix this today.", "Stop talking.", "Call me back.", "Clean your room.",
        "Wait here.", "Bring the report."]),
    "why": ("Why do {}?", [
        "cats purr", "birds fly south in winter", "onions make people cry", "stars twinkle", "we yawn",
        "dogs wag their tails", "bubbles pop", "ice cubes float", "we get hiccups", "apples turn brown",
        "people snore", "fireflies glow"]),
    "plan": ("Help me plan {}.", [
        "a picnic in the park", "a quiet weekend at home", "a short hike", "a family dinner", "a reading week",
        "a small garden", "a day at the museum", "a surprise party", "a morning routine", "a bike ride",
        "a movie night", "a visit to the zoo"]),
}


def ordinary_instructions(n: int | None = None, seed: int = 0) -> LabelledDataset:
    """Ordinary, harmless user instructions: every template of :data:`TEMPLATES` × its 12 fills (144).

    Chats with the user message only (scored), label 0, group = the template id; meta: ``template``,
    ``fill``. ``seed`` only matters when ``n`` draws a sample.
    """
    examples = [Example(messages=({"role": "user", "content": template.format(fill)},), label=0, group=tid,
                        meta={"template": tid, "fill": fill})
                for tid, (template, fills) in TEMPLATES.items() for fill in fills]
    return take(LabelledDataset("ordinary_instructions", tuple(examples)), n, seed)


__all__ = ["TEMPLATES", "ordinary_instructions"]
