"""The constraint suite shared by the runtime, CLI and server tests: JSON schemas of every shape the structured-answers
issue names (nested objects, arrays with min/max items, enums, integers and numbers with ranges, required and
optional keys, string patterns and lengths, anyOf), regexes, choices and Lark grammars. Strings carry maxLength so a
random-weight model (which otherwise emits arbitrary tokens) can finish them."""

from __future__ import annotations

import json
import re

from skin_offline.runtime.constraints import Choice, JsonObject, JsonSchema, Regex

S = {"type": "string", "maxLength": 12}

SCHEMAS: list[dict] = [
    # 0-5: flat objects, required and optional keys
    {"type": "object", "properties": {"lesion": S}, "required": ["lesion"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"a": S, "b": {"type": "boolean"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"a": S, "b": S}, "required": ["a"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"urgent": {"type": "boolean"}},
        "required": ["urgent"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"note": {"type": ["string", "null"], "maxLength": 8}},
        "required": ["note"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {}, "additionalProperties": False},
    # 6-11: enums and consts
    {
        "type": "object",
        "properties": {"next": {"enum": ["urgent", "routine", "no action"]}},
        "required": ["next"],
        "additionalProperties": False,
    },
    {"enum": ["benign", "malignant", "uncertain"]},
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["brown", "black", "red", "blue", "white"]},
            "border": {"enum": ["regular", "irregular"]},
        },
        "required": ["colour", "border"],
        "additionalProperties": False,
    },
    {"const": "melanoma"},
    {
        "type": "object",
        "properties": {"kind": {"const": "lesion"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["kind", "n"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    # 12-17: integers and numbers with ranges
    {"type": "integer", "minimum": 0, "maximum": 100},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {
        "type": "object",
        "properties": {"size_mm": {"type": "integer", "minimum": 1, "maximum": 50}},
        "required": ["size_mm"],
        "additionalProperties": False,
    },
    {"type": "number", "minimum": 0, "maximum": 1},
    {
        "type": "object",
        "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
        "required": ["p"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["age"],
        "additionalProperties": False,
    },
    # 18-23: strings with patterns and lengths
    {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {
        "type": "object",
        "properties": {"icd10": {"type": "string", "pattern": "^[A-Z][0-9]{2}(\\.[0-9])?$"}},
        "required": ["icd10"],
        "additionalProperties": False,
    },
    {"type": "string", "maxLength": 1},
    {
        "type": "object",
        "properties": {"site": {"type": "string", "minLength": 1, "maxLength": 6, "pattern": "^[a-z]+$"}},
        "required": ["site"],
        "additionalProperties": False,
    },
    {"type": "string", "format": "date"},
    # 24-29: arrays with min/max items, nesting
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    {
        "type": "object",
        "properties": {"findings": {"type": "array", "items": S, "minItems": 1, "maxItems": 2}},
        "required": ["findings"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "lesion": {
                "type": "object",
                "properties": {"colour": S, "raised": {"type": "boolean"}},
                "required": ["colour", "raised"],
                "additionalProperties": False,
            }
        },
        "required": ["lesion"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 3}},
            "required": ["x"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
    {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 5}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    # 30-35: anyOf, $defs / $ref, a clinic form
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]},
    {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "boolean"}, S]}},
        "required": ["v"],
        "additionalProperties": False,
    },
    {
        "anyOf": [
            {
                "type": "object",
                "properties": {"yes": {"type": "boolean"}},
                "required": ["yes"],
                "additionalProperties": False,
            },
            {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "maxItems": 2},
        ]
    },
    {
        "$defs": {"mm": {"type": "integer", "minimum": 0, "maximum": 30}},
        "type": "object",
        "properties": {"w": {"$ref": "#/$defs/mm"}, "h": {"$ref": "#/$defs/mm"}},
        "required": ["w", "h"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"n": {"type": "null"}}, "required": ["n"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {
            "lesion_type": {"enum": ["melanocytic", "non-melanocytic", "inflammatory", "unknown"]},
            "border": {"enum": ["regular", "irregular"]},
            "colours": {
                "type": "array",
                "items": {"enum": ["brown", "black", "red", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "diameter_mm": {"type": "integer", "minimum": 0, "maximum": 40},
            "next_step": {"enum": ["urgent referral", "routine review", "no action"]},
        },
        "required": ["lesion_type", "border", "colours", "diameter_mm", "next_step"],
        "additionalProperties": False,
    },
]

CLINIC_FORM = SCHEMAS[-1]

REGEXES = [
    r"[0-9]{3}-[A-Z]{2}",
    r"(urgent|routine|none)",
    r"[a-z]{1,8}( [a-z]{1,8}){0,2}",
    r"T[0-4]N[0-3]M[01]",
    r"[0-9]{1,2}(\.[0-9])? mm",
]

CHOICES = [
    ["urgent", "routine", "no action"],
    ["benign", "malignant"],
    ["Melanoma", "Nevus", "Seborrheic keratosis", "Basal cell carcinoma"],
]

GRAMMARS = [  # llguidance's Lark dialect, kept inside what the `lark` package parses too
    'start: answer\nanswer: "yes" | "no"\n',
    'start: "size " NUM " mm"\nNUM: /[0-9]{1,2}/\n',
    'start: item (", " item)? (", " item)?\nitem: "red" | "brown" | "black"\n',
    'start: "(" pair ")"\npair: LETTER "=" DIGIT\nLETTER: /[a-c]/\nDIGIT: /[0-9]/\n',
]


def valid(c, text: str) -> bool:
    """Whether `text` is in the constraint's language, judged by an independent library."""
    import jsonschema
    import lark

    if isinstance(c, (JsonSchema, JsonObject)):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        schema = c.schema if isinstance(c, JsonSchema) else {"type": "object"}
        return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).is_valid(value)
    if isinstance(c, Regex):
        return re.fullmatch(c.pattern, text) is not None
    if isinstance(c, Choice):
        return text in c.options
    try:
        lark.Lark(c.lark, start="start", parser="earley").parse(text)
        return True
    except lark.exceptions.LarkError:
        return False
