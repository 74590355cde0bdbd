"""Writes test.jsonl: short texts about a person, each with the name, age and city to extract.

Deterministic (seed 7); run from this directory: python3 make_data.py
"""
import json
import random

FIRST = ["Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas",
         "Kwame", "Lucia", "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tomasz"]
LAST = ["Lovelace", "Costa", "Romano", "Petrov", "Yilmaz", "Haddad", "Berg", "Tanaka", "Moreau",
        "Weber", "Mensah", "Ferrari", "Garcia", "Kowalski", "Sato", "Nair", "Dubois", "Silva"]
CITIES = ["Paris", "Lisbon", "Nairobi", "Osaka", "Toronto", "Berlin", "Lima", "Cairo", "Oslo",
          "Seoul", "Dublin", "Zürich", "Kraków", "Montréal"]
SHAPES = [
    "{name} is {age} years old and lives in {city}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "{city} resident {name}, aged {age}, works as a teacher.",
    "Meet {name}: {age}, living in {city}, loves cycling.",
    "At {age}, {name} moved to {city} for a new job.",
]

rng = random.Random(7)
with open("test.jsonl", "w", encoding="utf-8") as f:
    for i in range(60):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        age = rng.randint(19, 88)
        city = rng.choice(CITIES)
        text = rng.choice(SHAPES).format(name=name, age=age, city=city)
        f.write(json.dumps({"text": text, "name": name, "age": age, "city": city}, ensure_ascii=False) + "\n")
