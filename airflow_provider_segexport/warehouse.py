"""The sample warehouse: a SQLite database of unified customer profiles and segment definitions.

Used by the demo, the tests, the benchmarks and the example DAG's "refresh" task::

    segexport-warehouse build --path .demo/warehouse.db --profiles 20000 --sandbox-seed .demo/seed.json
    segexport-warehouse refresh --path .demo/warehouse.db
    segexport-warehouse seed --path .demo/warehouse.db --out .demo/seed.json
    segexport-warehouse mutate --path .demo/warehouse.db --change-fraction 0.01 --remove-fraction 0.005

Only the standard library is used. Everything is **deterministic**: the same ``profiles`` and
``seed`` give the same table contents (a single ``random.Random(seed)`` stream, consumed row by row;
contact GUIDs are ``uuid5`` of the seed and customer ID; no wall-clock value is stored by
:func:`build`). The profiles of a smaller build are a prefix of a larger build with the same seed.
The data is "as of" :data:`REFERENCE_DATE` (2026-08-01): no value depends on today's date.

Tables
------
``profiles``
    ``customer_id`` (``C0000001``...), ``email`` (nullable), ``first_name``, ``last_name``, ``phone``
    (text, nullable), ``city``, ``country`` (ISO 3166-1 alpha-2), ``birthday`` (``YYYY-MM-DD`` or
    NULL), ``signup_date``, ``lifetime_value`` (REAL, 2 decimals), ``loyalty_points``,
    ``orders_count``, ``last_order_date`` (NULL when ``orders_count = 0``), ``dataverse_contact_id``
    (GUID of the customer's contact in Dynamics 365), ``updated_at`` (``YYYY-MM-DDTHH:MM:SSZ``).
    Names come from 16 countries' locales, many non-ASCII (José, Zoë, Łukasz, Søren, Ngọc, 山田,
    Müller, O'Brien...). Emails are derived from the ASCII-folded names (``jose.garcia``,
    ``jgarcia4821``, ``jose.garcia85``...) on reserved domains only (``example.com/.org/.net``,
    ``*.example``, ``*.test``). Valid emails are unique case-insensitively after trimming, except for
    the deliberate duplicates below: an address taken by chance gets a number, as people do, and the
    rare remaining clash gets ``.<customer number>`` before the ``@`` (~0.2 % of 20,000 profiles,
    ~4 % of 1,000,000).
``profile_anomalies(customer_id, anomaly, detail)``
    One row per deliberate anomaly (the ground truth for tests). Rates are of all profiles:

    ========================  ==========  ===================================================
    anomaly                   rate        detail
    ========================  ==========  ===================================================
    ``invalid_email``         ~0.4 %      ``no_at``, ``two_at``, ``space_inside``,
                                          ``trailing_dot``, ``empty`` (``''``), ``null`` (NULL),
                                          about equally often
    ``duplicate_email``       ~0.3 %      the customer_id whose email this one repeats, with
                                          different case and/or surrounding whitespace
    ``padded_email``          ~0.5 %      leading/trailing spaces or tab; valid after trimming
    ``non_ascii_email``       1 in 2,000  e.g. ``josé.garcia@example.com``: fine per RFC 6531,
                                          typically refused by ESPs
    ``long_first_name``       1 in 2,500  first_name longer than 255 characters
    ``numeric_text``          ~0.1 %      first_name, last_name or city holding a numeric-looking
                                          string (``00123``, ``1e5``, ``007``...); the detail
                                          names the column. ``phone`` is always numeric-looking.
    ========================  ==========  ===================================================

    The 1-in-N anomalies sit at fixed positions (the first at customer 7 or 13), so every build of
    at least 2,500 profiles has some.
``destination_state(destination, email, status, customer_id)``
    Emails that already exist at a destination before any export (never an invalid, duplicate or
    non-ASCII email; the trimmed form). ``mailchimp``: ~1 % of profiles with a valid email
    ``unsubscribed`` and ~0.2 % ``cleaned`` (at random), 1 in 1,000 profiles ``archived`` and 1 in
    3,000 ``forgotten`` (permanently deleted: the API refuses to re-add them).
    ``campaign_monitor``: ~1 % ``Unsubscribed`` (at random), 1 in 2,000 ``Bounced``. The 1-in-N
    states go to the first profile with a valid email from customer 57 (archived), 101 (forgotten)
    and 211 (Bounced) on, so every build of 2,000 profiles or more has each state.
``dynamics365_contacts(contactid, email, first_name, last_name, customer_id)``
    The contacts that exist in Dynamics 365: ~98 % of profiles (their ``dataverse_contact_id``). The
    other ~2 % have a ``dataverse_contact_id`` no contact has, so a Dynamics 365 export rejects them
    with "contact not found". 1 in 500 contacts (the customers whose number is 23 modulo 500) is
    inactive (``statecode`` 1). Names are cut to 50 characters (Dataverse's column size). The view
    ``dataverse_contact_exists(customer_id, dataverse_contact_id, contact_exists)`` has one row per
    profile.
``segment_definitions(name, description, predicate, destinations)``
    SQL predicates over ``profiles`` with fixed reference dates; ``destinations`` is a
    comma-separated list. Approximate sizes: ``all_customers`` 100 %, ``churn_risk`` ~24 %,
    ``newsletter_fr`` ~12 %, ``loyalty_gold`` ~11 %, ``vip_customers`` ~8 %, ``recent_signups`` ~5 %.
``segment_members(segment_name, customer_id)`` (WITHOUT ROWID), ``segment_refresh_log``
    Written by :func:`refresh`, which rebuilds the membership in one transaction. The view
    ``segment_export`` (``segment_name`` then the ``profiles`` columns) joins members and profiles;
    ``SELECT * FROM segment_export WHERE segment_name = 'vip_customers' ORDER BY customer_id`` reads
    the members in primary-key order (no sort) and looks each profile up by its key.
``profile_changes(mutation, customer_id, kind, detail, changed_at)``
    Written by :func:`mutate` (``kind``: ``changed`` or ``left_segment``).
``warehouse_info(key, value)``
    Generator version, seed, profile count, reference date.

Timing (2-core machine, Python 3.11; ``build`` prints its own): 20,000 profiles build in ~0.6 s and
refresh in 0.1 s; 1,000,000 build in ~40-50 s (a third generating rows, a third inserting them) and
refresh in ~4 s; writing the 1,000,000-profile sandbox seed takes ~10 s (150 MB, mostly contacts).
Memory stays under 300 MB: rows are generated and inserted 10,000 at a time.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import re
import sqlite3
import sys
import time
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GENERATOR_VERSION = "1"
REFERENCE_DATE = "2026-08-01"
MAX_PROFILES = 1_000_000
CHUNK = 10_000

#: Namespace of the contact GUIDs (``uuid5(namespace, f"{seed}:{customer_id}")``).
CONTACT_NAMESPACE = uuid.UUID("6f1d3c2a-5b7e-4c1d-9a8f-2e4b6c8d0a1f")

# Anomaly rates (of all profiles) and positions; see the module docstring.
INVALID_EMAIL_RATE = 0.004
DUPLICATE_EMAIL_RATE = 0.003
PADDED_EMAIL_RATE = 0.005
NUMERIC_TEXT_RATE = 0.001
NON_ASCII_EMAIL_EVERY, NON_ASCII_EMAIL_OFFSET = 2000, 13
LONG_NAME_EVERY, LONG_NAME_OFFSET = 2500, 7
INVALID_KINDS = ("no_at", "two_at", "space_inside", "trailing_dot", "empty", "null")

# Destination state rates (of profiles with a valid email; Dynamics 365: of all profiles).
# Drawn at random:
MAILCHIMP_STATES = (("unsubscribed", 0.010), ("cleaned", 0.002))
CAMPAIGN_MONITOR_STATES = (("Unsubscribed", 0.010),)
# The rarer states at fixed positions (the first profile with a valid email from customer
# ``offset`` on, then every ``every``), so that even a 2,000-profile build has each of them:
POSITIONAL_STATES = (("mailchimp", "archived", 1000, 57), ("mailchimp", "forgotten", 3000, 101),
                     ("campaign_monitor", "Bounced", 2000, 211))
DYNAMICS_MISSING_RATE = 0.02
#: 1 in INACTIVE_CONTACT_EVERY existing contacts (by customer number) is inactive (statecode 1)
INACTIVE_CONTACT_EVERY, INACTIVE_CONTACT_OFFSET = 500, 23

SEGMENTS: list[dict[str, Any]] = [
    {
        "name": "all_customers",
        "description": "Every profile (the full-audience sync).",
        "predicate": "1 = 1",
        "destinations": "mailchimp,campaign_monitor,dynamics365",
        "leave": None,
    },
    {
        "name": "vip_customers",
        "description": "Lifetime value of at least 750.",
        "predicate": "lifetime_value >= 750",
        "destinations": "mailchimp,dynamics365",
        "leave": "lifetime_value = 250.0",  # a large refund
    },
    {
        "name": "newsletter_fr",
        "description": "Customers in France (French-language newsletter).",
        "predicate": "country = 'FR'",
        "destinations": "mailchimp,campaign_monitor",
        "leave": "country = 'BE', city = 'Bruxelles'",  # moved to Belgium
    },
    {
        "name": "churn_risk",
        "description": "Customers who ordered before but not since 2026-05-01.",
        "predicate": "orders_count > 0 AND last_order_date < '2026-05-01'",
        "destinations": "mailchimp,campaign_monitor,dynamics365",
        "leave": "orders_count = orders_count + 1, last_order_date = '2026-07-31'",  # ordered again
    },
    {
        "name": "loyalty_gold",
        "description": "At least 800 loyalty points.",
        "predicate": "loyalty_points >= 800",
        "destinations": "mailchimp,dynamics365",
        "leave": "loyalty_points = 300",  # points expired
    },
    {
        "name": "recent_signups",
        "description": "Signed up since 2026-01-01.",
        "predicate": "signup_date >= '2026-01-01'",
        "destinations": "campaign_monitor",
        "leave": None,
    },
]

_SEGMENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")

SCHEMA = """
CREATE TABLE profiles (
    customer_id TEXT PRIMARY KEY,
    email TEXT,
    first_name TEXT,
    last_name TEXT,
    phone TEXT,
    city TEXT,
    country TEXT,
    birthday TEXT,
    signup_date TEXT,
    lifetime_value REAL,
    loyalty_points INTEGER,
    orders_count INTEGER,
    last_order_date TEXT,
    dataverse_contact_id TEXT,
    updated_at TEXT
);
CREATE TABLE profile_anomalies (
    customer_id TEXT NOT NULL,
    anomaly TEXT NOT NULL,
    detail TEXT,
    PRIMARY KEY (customer_id, anomaly)
) WITHOUT ROWID;
CREATE TABLE destination_state (
    destination TEXT NOT NULL,
    email TEXT NOT NULL,
    status TEXT NOT NULL,
    customer_id TEXT
);
CREATE TABLE dynamics365_contacts (
    contactid TEXT NOT NULL,
    email TEXT,
    first_name TEXT,
    last_name TEXT,
    customer_id TEXT,
    statecode INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE segment_definitions (
    name TEXT PRIMARY KEY,
    description TEXT,
    predicate TEXT NOT NULL,
    destinations TEXT
);
CREATE TABLE segment_members (
    segment_name TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    PRIMARY KEY (segment_name, customer_id)
) WITHOUT ROWID;
CREATE TABLE segment_refresh_log (
    segment_name TEXT NOT NULL,
    refreshed_at TEXT NOT NULL,
    member_count INTEGER NOT NULL
);
CREATE TABLE profile_changes (
    mutation INTEGER NOT NULL,
    customer_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT,
    changed_at TEXT NOT NULL
);
CREATE TABLE warehouse_info (key TEXT PRIMARY KEY, value TEXT);
CREATE VIEW segment_export AS
    SELECT m.segment_name AS segment_name, m.customer_id AS customer_id, p.email, p.first_name, p.last_name,
           p.phone, p.city, p.country, p.birthday, p.signup_date, p.lifetime_value, p.loyalty_points,
           p.orders_count, p.last_order_date, p.dataverse_contact_id, p.updated_at
    FROM segment_members AS m JOIN profiles AS p ON p.customer_id = m.customer_id;
CREATE VIEW dataverse_contact_exists AS
    SELECT p.customer_id, p.dataverse_contact_id,
           EXISTS (SELECT 1 FROM dynamics365_contacts AS c WHERE c.contactid = p.dataverse_contact_id)
               AS contact_exists
    FROM profiles AS p;
"""

# --------------------------------------------------------------------------------------------
# Names, places, domains
# --------------------------------------------------------------------------------------------

_FOLD = str.maketrans({
    "ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "Ae", "ß": "ss", "đ": "d", "Đ": "D",
    "œ": "oe", "Œ": "Oe", "ı": "i", "ð": "d", "þ": "th",
})


def ascii_fold(text: str) -> str:
    """``"Łukasz Müller-Søren"`` -> ``"Lukasz Muller-Soren"`` (characters with no ASCII form dropped)."""
    text = unicodedata.normalize("NFKD", text.translate(_FOLD))
    return "".join(c for c in text if not unicodedata.combining(c)).encode("ascii", "ignore").decode()


def _token(name: str) -> str:
    """The email form of a name: ASCII-folded, lower case, letters and hyphens only."""
    return re.sub(r"[^a-z-]", "", ascii_fold(name).lower()).strip("-")


def _names(spec: str) -> list[tuple[str, str]]:
    """``"José Zoë 山田=Yamada"`` -> ``[("José", "jose"), ("Zoë", "zoe"), ("山田", "yamada")]``."""
    out = []
    for item in spec.split():
        display, _, romanised = item.partition("=")
        display = display.replace("_", " ")
        out.append((display, _token(romanised or display)))
    return out


# country, weight, first names, last names, cities, phone format (# = random digit)
_LOCALES_SPEC = [
    ("US", 16, "James Mary Michael Jennifer Robert Linda David Emily Chris Jessica Ashley Tyler Madison "
     "Brandon Kayla Zoë Renée DeShawn Jamal Aaliyah Mia Ethan Olivia Noah Sophia Liam",
     "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Wilson Anderson Taylor "
     "Thomas Moore Jackson Lee White Harris O'Brien McDonald Nguyen Kowalski",
     "New_York Chicago Houston Phoenix Seattle Denver Boston Austin Portland Atlanta",
     "+1 ###-555-01##"),
    ("GB", 9, "Oliver George Harry Jack Amelia Isla Ava Emily Sophie Charlotte Siobhan Niamh Rhys Dafydd "
     "Aoife Chloë Zoë Alfie Freya Imogen",
     "Smith Jones Taylor Brown Williams Wilson Evans Thomas Roberts Walker Wright Robinson O'Connor "
     "Ffrench Llewellyn Patel Khan Hughes",
     "London Manchester Birmingham Leeds Glasgow Cardiff Bristol Edinburgh Liverpool Norwich",
     "+44 7### ######"),
    ("IE", 2, "Seán Aoife Siobhán Ciarán Niamh Róisín Pádraig Saoirse Oisín Éabha Conor Aisling",
     "O'Brien O'Sullivan Murphy Kelly Walsh Ó_Briain Byrne Ryan O'Neill Mac_Giolla Doyle",
     "Dublin Cork Galway Limerick Waterford Kilkenny",
     "+353 8# ### ####"),
    ("FR", 12, "Jean Marie Pierre Camille Léa Chloé Hélène François Amélie Benoît Émilie Jérôme Zoë "
     "Gaëlle Loïc Anaïs Noël Céline Théo Inès Mathéo Léon Maëlys",
     "Martin Bernard Dubois Thomas Robert Richard Petit Durand Leroy Moreau Lefèvre Girard Bonnet "
     "Dupont Lambert Fontaine Rousseau Mercier Bérenger Lévêque D'Almeida",
     "Paris Lyon Marseille Toulouse Nice Nantes Strasbourg Montpellier Bordeaux Lille Orléans Besançon",
     "+33 6 ## ## ## ##"),
    ("BE", 2, "Lucas Emma Louis Léa Wout Lotte Arthur Eline Noé Maëlle Jef Anouk",
     "Peeters Janssens Maes Jacobs Mertens Willems Claes Goossens Dubois Lambert Dupont Van_den_Bossche",
     "Bruxelles Antwerpen Gent Liège Namur Brugge Leuven",
     "+32 4## ## ## ##"),
    ("DE", 10, "Lukas Leon Finn Jonas Paul Anna Lena Lea Hannah Sophie Jürgen Günther Jörg Björn Käthe "
     "Mareike Sören Uwe Heike Dörte",
     "Müller Schmidt Schneider Fischer Weber Meyer Wagner Becker Schulz Hoffmann Schäfer Koch Bauer "
     "Richter Klein Wolf Schröder Neumann Schwarz Krüger Weiß Groß Jäger Köhler",
     "Berlin Hamburg München Köln Frankfurt Stuttgart Düsseldorf Leipzig Nürnberg Dresden",
     "+49 15# #######"),
    ("AT", 1, "Lukas Tobias Elias Sarah Johanna Lena Felix Valentina Florian Katharina",
     "Gruber Huber Bauer Wagner Müller Pichler Steiner Moser Mayer Hofer Leitner",
     "Wien Graz Linz Salzburg Innsbruck Klagenfurt",
     "+43 66# #######"),
    ("ES", 6, "José María Antonio Carmen Manuel Lucía Javier Sofía Álvaro Martina Íñigo Begoña Raúl "
     "Nuria Jesús Ainhoa Sergio Marta Iñaki Rocío",
     "García Fernández González Rodríguez López Martínez Sánchez Pérez Gómez Martín Jiménez Ruiz "
     "Hernández Díaz Moreno Muñoz Álvarez Romero Ibáñez Peña",
     "Madrid Barcelona Valencia Sevilla Zaragoza Málaga Bilbao Córdoba Alicante Palma",
     "+34 6## ### ###"),
    ("MX", 3, "José Juan Luis Guadalupe Ximena Valentina Santiago Mateo Regina Camila Jesús Andrés",
     "Hernández García Martínez López González Pérez Rodríguez Sánchez Ramírez Cruz Flores Gómez",
     "Ciudad_de_México Guadalajara Monterrey Puebla Querétaro Mérida Tijuana León",
     "+52 55 #### ####"),
    ("IT", 6, "Giuseppe Giovanni Antonio Mario Luca Francesco Giulia Sofia Aurora Alessandro Chiara "
     "Niccolò Nicolò Ilaria Federica Matteo",
     "Rossi Russo Ferrari Esposito Bianchi Romano Colombo Ricci Marino Greco Bruno Gallo Conti "
     "De_Luca D'Angelo Mancini Lombardi Caruso",
     "Roma Milano Napoli Torino Palermo Genova Bologna Firenze Venezia Verona",
     "+39 3## ### ####"),
    ("PL", 5, "Łukasz Paweł Michał Krzysztof Piotr Tomasz Agnieszka Małgorzata Katarzyna Zofia Joanna "
     "Grzegorz Wojciech Bożena Jędrzej Żaneta",
     "Nowak Kowalski Wiśniewski Wójcik Kowalczyk Kamiński Lewandowski Zieliński Szymański Woźniak "
     "Dąbrowski Kozłowski Jankowski Mazur Krawczyk Piątek",
     "Warszawa Kraków Łódź Wrocław Poznań Gdańsk Szczecin Lublin Białystok Katowice",
     "+48 5## ### ###"),
    ("DK", 3, "Søren Mette Jens Anne Mads Frederik Ida Freja Bjørn Astrid Sørine Rasmus",
     "Jensen Nielsen Hansen Pedersen Andersen Christensen Larsen Sørensen Rasmussen Jørgensen Møller "
     "Kjærgaard",
     "København Aarhus Odense Aalborg Esbjerg Randers Kolding",
     "+45 ## ## ## ##"),
    ("SE", 2, "Åsa Björn Oskar Elsa Linnéa Maja Göran Märta Hugo Astrid Måns Ebba",
     "Andersson Johansson Karlsson Nilsson Eriksson Larsson Olsson Persson Svensson Gustafsson Öberg "
     "Åberg Lindström",
     "Stockholm Göteborg Malmö Uppsala Västerås Örebro Linköping",
     "+46 70 ### ## ##"),
    ("VN", 4, "Ngọc Minh Anh Hương Thảo Linh Tuấn Dũng Hùng Trang Phương Quân Đức Hạnh",
     "Nguyễn Trần Lê Phạm Hoàng Huỳnh Phan Vũ Võ Đặng Bùi Đỗ Hồ Ngô",
     "Hà_Nội Hồ_Chí_Minh Đà_Nẵng Hải_Phòng Cần_Thơ Huế Nha_Trang",
     "+84 9# ### ## ##"),
    ("JP", 4, "太郎=Taro 花子=Hanako 健=Ken 陽菜=Hina 翔=Sho 結衣=Yui 大輔=Daisuke 美咲=Misaki Haruto Yuki "
     "Sakura Ren Aoi",
     "山田=Yamada 佐藤=Sato 鈴木=Suzuki 高橋=Takahashi 田中=Tanaka 伊藤=Ito 渡辺=Watanabe 中村=Nakamura "
     "Kobayashi Kato Yoshida",
     "東京=Tokyo 大阪=Osaka 横浜=Yokohama 名古屋=Nagoya 札幌=Sapporo Kyoto Fukuoka Kobe",
     "+81 90-####-####"),
    ("BR", 5, "João Maria José Ana Luíz Gabriel Júlia Letícia Thiago Beatriz Conceição Sebastião Lívia",
     "Silva Santos Oliveira Souza Rodrigues Ferreira Alves Pereira Lima Gomes Araújo Conceição "
     "Gonçalves Simões Magalhães",
     "São_Paulo Rio_de_Janeiro Brasília Salvador Fortaleza Belo_Horizonte Curitiba Recife Belém",
     "+55 11 9####-####"),
]


class _Locale:
    __slots__ = ("country", "first", "last", "cities", "phone", "phone_template", "phone_digits", "phone_space")

    def __init__(self, country: str, first: str, last: str, cities: str, phone: str) -> None:
        self.country = country
        self.first = _names(first)
        self.last = _names(last)
        self.cities = [c for c, _ in _names(cities)]
        self.phone = phone
        self.phone_template = phone.replace("#", "{}")
        self.phone_digits = phone.count("#")
        self.phone_space = 10 ** self.phone_digits


LOCALES = [_Locale(c, f, la, ci, ph) for c, _w, f, la, ci, ph in _LOCALES_SPEC]
_LOCALE_CUM = []
_total = 0
for _spec in _LOCALES_SPEC:
    _total += _spec[1]
    _LOCALE_CUM.append(_total / 100)
_LOCALE_CUM[-1] = 1.0
del _total, _spec

#: Non-ASCII first names used for the ``non_ascii_email`` anomaly (kept unfolded in the local part).
NON_ASCII_FIRST = ["José", "Zoë", "Søren", "Łukasz", "Renée", "Jürgen", "Chloé", "Björn", "Iñaki", "Ngọc",
                   "Åsa", "Gaëlle"]

#: Reserved domains only (RFC 2606 / RFC 6761): never a real mailbox.
DOMAINS = [
    ("example.com", 30), ("example.org", 14), ("example.net", 12), ("mail.example", 10),
    ("inbox.example", 8), ("post.example", 6), ("mail.example.com", 5), ("webmail.test", 5),
    ("correo.example", 4), ("courriel.test", 3), ("poczta.example", 2), ("shop.test", 1),
]
_DOMAIN_NAMES = [d for d, _ in DOMAINS]
_DOMAIN_CUM = []
_acc = 0
for _d, _w in DOMAINS:
    _acc += _w
    _DOMAIN_CUM.append(_acc)
_DOMAIN_TOTAL = _acc
del _acc, _d, _w

_NUMERIC_STRINGS = ["00123", "1e5", "007", "12345", "0.50", "2024", "-1", "1E10", "0x1F", "3,14", "000"]
_LONG_FILLER = ["Anna", "Maria", "Josefina", "Alexandra", "Konstantina", "Evangelina", "Wilhelmina"]

_EPOCH = dt.date(2015, 1, 1).toordinal()
_REF = dt.date.fromisoformat(REFERENCE_DATE).toordinal()
_BIRTH_FIRST = dt.date(1946, 1, 1).toordinal()
_BIRTH_LAST = dt.date(2008, 12, 31).toordinal()
#: ISO dates from _BIRTH_FIRST to the reference date, indexed by ordinal - _BIRTH_FIRST (no per-row formatting).
_DATES = [dt.date.fromordinal(o).isoformat() for o in range(_BIRTH_FIRST, _REF + 1)]

_CONTACT_HASH = hashlib.sha1(CONTACT_NAMESPACE.bytes)  # noqa: S324 - uuid5 is defined with SHA-1


def contact_guid(seed: int, cid: str) -> str:
    """``str(uuid.uuid5(CONTACT_NAMESPACE, f"{seed}:{cid}"))``, five times faster."""
    h = _CONTACT_HASH.copy()
    h.update(f"{seed}:{cid}".encode())
    b = bytearray(h.digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    x = b.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def customer_id(index: int) -> str:
    return f"C{index:07d}"


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

_TIMES = [f"T{h:02d}:{m:02d}:{sec:02d}Z" for h in range(24) for m in range(60) for sec in range(60)]
_MAILCHIMP_CUM = [(sum(r for _, r in MAILCHIMP_STATES[: i + 1]), s) for i, (s, _) in enumerate(MAILCHIMP_STATES)]
_CM_CUM = [(sum(r for _, r in CAMPAIGN_MONITOR_STATES[: i + 1]), s) for i, (s, _) in enumerate(CAMPAIGN_MONITOR_STATES)]
_ANY_PICK = max(_MAILCHIMP_CUM[-1][0], _CM_CUM[-1][0])


class _Generator:
    """Generates profile rows (and their anomalies and destination picks) from one random stream.

    Written for speed (locals, no helper calls on the common path): this loop is most of the
    build time.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.recent: list[tuple[str, str]] = []  # (customer_id, email) of recent valid emails
        # Emails of the digit-free patterns handed out. Bounded by the names x domains space
        # (about 300,000), not by the number of profiles.
        self.taken: set[str] = set()
        self.pending: dict[str, str] = {}  # destination -> positional state waiting for a valid email

    def generate(self, start: int, stop: int, rows: list, anomalies: list, picks: list) -> None:
        """Append the rows of customers ``start`` .. ``stop - 1``."""
        rng = self.rng
        rnd = rng.random
        expovariate = rng.expovariate
        lognormvariate = rng.lognormvariate
        bisect_right = bisect.bisect_right
        locales, locale_cum, dates, times = LOCALES, _LOCALE_CUM, _DATES, _TIMES
        d0, ref, epoch_span = _BIRTH_FIRST, _REF, _REF - 1 - _EPOCH
        birth_span = _BIRTH_LAST - _BIRTH_FIRST
        domains, domain_cum, domain_total = _DOMAIN_NAMES, _DOMAIN_CUM, _DOMAIN_TOTAL
        recent = self.recent
        taken = self.taken
        pending = self.pending
        any_anomaly = INVALID_EMAIL_RATE + DUPLICATE_EMAIL_RATE + PADDED_EMAIL_RATE
        contact_hash = _CONTACT_HASH
        seed_prefix = f"{self.seed}:"
        append = rows.append
        for index in range(start, stop):
            cid = f"C{index:07d}"
            loc = locales[bisect_right(locale_cum, rnd())]
            lf = loc.first
            first, ftok = lf[int(rnd() * len(lf))]
            ll = loc.last
            last, ltok = ll[int(rnd() * len(ll))]
            if loc.country == "JP" and rnd() < 0.5:  # half the Japanese profiles are written in romaji
                if not first.isascii():
                    first = ftok.capitalize()
                if not last.isascii():
                    last = ltok.capitalize()
            lc = loc.cities
            city = lc[int(rnd() * len(lc))]
            if rnd() < 0.03:
                phone = None
            else:
                phone = loc.phone_template.format(*str(int(rnd() * loc.phone_space)).zfill(loc.phone_digits))
            if rnd() < 0.08:
                birthday = None
                birth_year = 1980 + int(rnd() * 25)  # for the email only
            else:
                birthday = dates[int(rnd() * birth_span)]
                birth_year = int(birthday[:4])
            signup = _EPOCH + int(rnd() * epoch_span)
            if rnd() < 0.18:
                orders, ltv, last_order = 0, 0.0, None
                points = 100 if rnd() < 0.5 else 0  # sign-up bonus
                last_activity = signup
            else:
                orders = 1 + min(199, int(expovariate(0.25)))
                ltv = round(orders * lognormvariate(4.1, 0.55), 2)
                points = int(ltv * (0.8 + 0.7 * rnd())) + 100
                last_activity = max(signup, ref - 1 - int(expovariate(1 / 75.0)))
                last_order = dates[last_activity - d0]
            upd = last_activity + int(rnd() * (ref - 1 - last_activity))
            updated_at = dates[upd - d0] + times[int(rnd() * 86400)]

            # Email: a pattern over the folded names, on a reserved domain.
            f = ftok or "user"
            la = ltok or "customer"
            r = rnd()
            if r < 0.30:  # patterns without digits: taken quickly, as in real life
                if r < 0.14:
                    local = f"{f}.{la}"
                elif r < 0.18:
                    local = f + la
                elif r < 0.24:
                    local = f[:1] + la
                elif r < 0.26:
                    local = f"{f}_{la}"
                else:
                    local = f"{la}.{f}"
                domain = domains[bisect_right(domain_cum, rnd() * domain_total)]
                email = f"{local}@{domain}"
                if email in taken:  # "that address is taken": add a number, as people do
                    email = f"{local}{1 + int(rnd() * 9999)}@{domain}"
                else:
                    taken.add(email)
            else:
                if r < 0.45:
                    local = f"{f}.{la}{birth_year % 100:02d}"
                elif r < 0.59:
                    local = f"{f}{la}{1 + int(rnd() * 999)}"
                elif r < 0.69:
                    local = f"{f[:1]}{la}{1 + int(rnd() * 9999)}"
                elif r < 0.77:
                    local = f"{f}{birth_year}"
                elif r < 0.85:
                    local = f"{f}.{la}{birth_year}"
                elif r < 0.92:
                    local = f"{f}.{la}{1 + int(rnd() * 99)}"
                else:
                    local = f"{la}{f[:1]}{1 + int(rnd() * 9999)}"
                domain = domains[bisect_right(domain_cum, rnd() * domain_total)]
                email = f"{local}@{domain}"
            u = rnd()  # email anomaly draw
            v = rnd()  # numeric_text draw
            w = rnd()  # destination draws (mailchimp, campaign monitor, dynamics 365)
            x = rnd()
            y = rnd()
            eligible = True
            if index % NON_ASCII_EMAIL_EVERY == NON_ASCII_EMAIL_OFFSET:
                first = NON_ASCII_FIRST[(index // NON_ASCII_EMAIL_EVERY) % len(NON_ASCII_FIRST)]
                email = f"{first.lower()}.{la}@{domain}"
                anomalies.append((cid, "non_ascii_email", first))
                eligible = False
            elif u >= any_anomaly:
                if len(recent) < 1000:
                    recent.append((cid, email))
                else:
                    recent[index % 1000] = (cid, email)
            else:
                eligible = self._email_anomaly(cid, u, email, f, la, anomalies)
                if not eligible or u >= INVALID_EMAIL_RATE + DUPLICATE_EMAIL_RATE:
                    email = self._last_email
            if index % LONG_NAME_EVERY == LONG_NAME_OFFSET:
                parts = [first]
                k = index // LONG_NAME_EVERY
                while sum(len(p) + 1 for p in parts) <= 255 + (k % 7) * 20:
                    parts.append(_LONG_FILLER[(len(parts) + k) % len(_LONG_FILLER)])
                first = " ".join(parts)
                anomalies.append((cid, "long_first_name", str(len(first))))
            elif v < NUMERIC_TEXT_RATE:
                value = _NUMERIC_STRINGS[int(v / NUMERIC_TEXT_RATE * len(_NUMERIC_STRINGS))]
                col = int(v * 1e7) % 3
                if col == 0:
                    first = value
                elif col == 1:
                    last = value
                else:
                    city = value
                anomalies.append((cid, "numeric_text", ("first_name", "last_name", "city")[col]))

            # Destination state picks (their emails are resolved after de-duplication).
            for destination, status, every, offset in POSITIONAL_STATES:
                if index % every == offset:
                    pending[destination] = status
            if eligible and pending:
                if "mailchimp" in pending:
                    picks.append((cid, "mailchimp", pending.pop("mailchimp")))
                    w = 1.0
                if "campaign_monitor" in pending:
                    picks.append((cid, "campaign_monitor", pending.pop("campaign_monitor")))
                    x = 1.0
            if eligible and (w < _ANY_PICK or x < _ANY_PICK):
                for limit, status in _MAILCHIMP_CUM:
                    if w < limit:
                        picks.append((cid, "mailchimp", status))
                        break
                for limit, status in _CM_CUM:
                    if x < limit:
                        picks.append((cid, "campaign_monitor", status))
                        break
            if y < DYNAMICS_MISSING_RATE:
                picks.append((cid, "dynamics365", "missing"))

            h = contact_hash.copy()
            h.update((seed_prefix + cid).encode())
            g = bytearray(h.digest()[:16])
            g[6] = (g[6] & 0x0F) | 0x50
            g[8] = (g[8] & 0x3F) | 0x80
            hx = g.hex()
            append((cid, email, first, last, phone, city, loc.country, birthday, dates[signup - d0], ltv, points,
                    orders, last_order, f"{hx[:8]}-{hx[8:12]}-{hx[12:16]}-{hx[16:20]}-{hx[20:]}", updated_at))

    def _email_anomaly(self, cid: str, u: float, email: str, f: str, la: str, anomalies: list) -> bool:
        """Apply the email anomaly drawn (``u``); set ``_last_email``; return whether still valid."""
        if u < INVALID_EMAIL_RATE:
            kind = INVALID_KINDS[int(u / INVALID_EMAIL_RATE * len(INVALID_KINDS))]
            local, _, dom = email.partition("@")
            self._last_email = {
                "no_at": local + dom,
                "two_at": f"{local}@{la}@{dom}",
                "space_inside": f"{f} {la}@{dom}",
                "trailing_dot": email + ".",
                "empty": "",
                "null": None,
            }[kind]
            anomalies.append((cid, "invalid_email", kind))
            return False
        if u < INVALID_EMAIL_RATE + DUPLICATE_EMAIL_RATE and self.recent:
            src_id, src = self.recent[int((u - INVALID_EMAIL_RATE) / DUPLICATE_EMAIL_RATE * len(self.recent))]
            variant = int(u * 1e6) % 4
            if variant == 0:
                dup = src.upper()
            elif variant == 1:
                dup = " " + src.capitalize() + " "
            elif variant == 2:
                dup = src.title() + "  "
            else:
                dup = "\t" + src.swapcase()
            if dup == src:  # no letter to change the case of: the whitespace differs at least
                dup = " " + src
            self._last_email = dup
            anomalies.append((cid, "duplicate_email", src_id))
            return False
        if u < INVALID_EMAIL_RATE + DUPLICATE_EMAIL_RATE:  # no email to duplicate yet
            self._last_email = email
            return True
        pad = (" ", "  ", "\t")[int(u * 1e6) % 3]
        where = int(u * 1e7) % 3
        self._last_email = pad + email if where == 0 else email + pad if where == 1 else pad + email + pad
        anomalies.append((cid, "padded_email", {" ": "space", "  ": "2 spaces", "\t": "tab"}[pad]
                          + (" before", " after", " around")[where]))
        return True


def _connect(path: str | os.PathLike) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)  # explicit BEGIN/COMMIT
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.unlink()


@contextlib.contextmanager
def _transaction(path: str | os.PathLike, begin: str, *pragmas: str, after: tuple[str, ...] = ()):
    """One write transaction on the warehouse: pragmas, ``begin``, the body, COMMIT (ROLLBACK on error)."""
    conn = _connect(path)
    try:
        for pragma in pragmas:
            conn.execute(pragma)
        conn.execute(begin)
        yield conn
        conn.execute("COMMIT")
        for statement in after:
            conn.execute(statement)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def build(path: str | os.PathLike, profiles: int = 20_000, seed: int = 42) -> dict:
    """Create the warehouse at ``path`` (replacing any file there); return a summary dict.

    Membership is not materialised: call :func:`refresh` (the CLI ``build`` does both).
    """
    if not 1 <= profiles <= MAX_PROFILES:
        raise ValueError(f"profiles must be between 1 and {MAX_PROFILES:,}, got {profiles}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_db(path)
    started = time.perf_counter()
    with _transaction(path, "BEGIN", "PRAGMA journal_mode = WAL", "PRAGMA synchronous = OFF",
                      "PRAGMA cache_size = -100000", "PRAGMA temp_store = MEMORY",
                      after=("PRAGMA wal_checkpoint(TRUNCATE)",)) as conn:
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        conn.execute("CREATE TEMP TABLE picks (customer_id TEXT, destination TEXT, status TEXT)")
        gen = _Generator(seed)
        insert_profile = "INSERT INTO profiles VALUES (" + ",".join("?" * 15) + ")"
        for start in range(1, profiles + 1, CHUNK):
            rows: list[tuple] = []
            anomalies: list[tuple] = []
            picks: list[tuple] = []
            gen.generate(start, min(profiles + 1, start + CHUNK), rows, anomalies, picks)
            conn.executemany(insert_profile, rows)
            conn.executemany("INSERT INTO profile_anomalies VALUES (?, ?, ?)", anomalies)
            conn.executemany("INSERT INTO temp.picks VALUES (?, ?, ?)", picks)
        renamed = _deduplicate_emails(conn)
        _destination_tables(conn)
        conn.execute("CREATE INDEX profiles_updated_at ON profiles (updated_at)")
        conn.executemany(
            "INSERT INTO segment_definitions VALUES (?, ?, ?, ?)",
            [(s["name"], s["description"], s["predicate"], s["destinations"]) for s in SEGMENTS],
        )
        conn.executemany("INSERT INTO warehouse_info VALUES (?, ?)", [
            ("generator_version", GENERATOR_VERSION), ("seed", str(seed)), ("profiles", str(profiles)),
            ("reference_date", REFERENCE_DATE),
        ])
        conn.execute("DROP TABLE temp.picks")
    summary = summarize(path)
    summary["renamed_duplicate_emails"] = renamed
    summary["build_seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.strip().splitlines():
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""


def _deduplicate_emails(conn: sqlite3.Connection) -> int:
    """Names repeat, so generated emails collide by chance: give every later holder of a valid email
    a ``.<customer number>`` suffix (generated local parts never end in ``.<digits>``, so the result
    is unique). Deliberate anomalies are left alone. Returns how many were renamed."""
    conn.execute("""
        CREATE TEMP TABLE renames AS
        SELECT customer_id FROM (
            SELECT customer_id,
                   ROW_NUMBER() OVER (PARTITION BY lower(trim(email, ' ' || char(9))) ORDER BY customer_id) AS rn
            FROM profiles
            WHERE email IS NOT NULL AND customer_id NOT IN (
                SELECT customer_id FROM profile_anomalies WHERE anomaly IN ('invalid_email', 'duplicate_email')
            )
        ) WHERE rn > 1
    """)
    n = conn.execute("SELECT count(*) FROM temp.renames").fetchone()[0]
    conn.execute("""
        UPDATE profiles
        SET email = substr(email, 1, instr(email, '@') - 1) || '.' || CAST(substr(customer_id, 2) AS INTEGER)
                    || substr(email, instr(email, '@'))
        WHERE customer_id IN (SELECT customer_id FROM temp.renames)
    """)
    conn.execute("DROP TABLE temp.renames")
    return n


def _destination_tables(conn: sqlite3.Connection) -> None:
    conn.execute("""
        INSERT INTO destination_state (destination, email, status, customer_id)
        SELECT k.destination, trim(p.email, ' ' || char(9)), k.status, k.customer_id
        FROM temp.picks AS k JOIN profiles AS p ON p.customer_id = k.customer_id
        WHERE k.destination IN ('mailchimp', 'campaign_monitor')
        ORDER BY k.destination, k.customer_id
    """)
    conn.execute("""
        INSERT INTO dynamics365_contacts (contactid, email, first_name, last_name, customer_id)
        SELECT dataverse_contact_id, NULLIF(trim(email, ' ' || char(9)), ''), substr(first_name, 1, 50),
               substr(last_name, 1, 50), customer_id
        FROM profiles
        WHERE customer_id NOT IN (SELECT customer_id FROM temp.picks WHERE destination = 'dynamics365')
        ORDER BY customer_id
    """)
    # Deactivated contacts, at fixed positions (every build of 1,000 profiles or more has some).
    conn.execute(f"UPDATE dynamics365_contacts SET statecode = 1 WHERE CAST(substr(customer_id, 2) AS INTEGER) "
                 f"% {INACTIVE_CONTACT_EVERY} = {INACTIVE_CONTACT_OFFSET}")
    # Indexed after the insert: GUIDs arrive in random order, and building the index by sorting is faster.
    conn.execute("CREATE UNIQUE INDEX dynamics365_contacts_contactid ON dynamics365_contacts (contactid)")


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------

def refresh(path: str | os.PathLike, *, refreshed_at: str | None = None) -> dict[str, int]:
    """Materialise ``segment_members`` from ``segment_definitions`` in one transaction.

    Appends a row per segment to ``segment_refresh_log`` (``refreshed_at``: now, UTC, unless given)
    and returns the member count per segment.
    """
    refreshed_at = refreshed_at or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    counts: dict[str, int] = {}
    with _transaction(_existing(path), "BEGIN IMMEDIATE", "PRAGMA cache_size = -100000",
                      "PRAGMA temp_store = MEMORY") as conn:
        definitions = conn.execute("SELECT name, predicate FROM segment_definitions ORDER BY name").fetchall()
        for name, _ in definitions:
            if not _SEGMENT_NAME.match(name):
                raise ValueError(f"segment name {name!r} is not short snake_case (it becomes a Mailchimp tag)")
        # Dropping and re-creating is much faster than deleting a million rows.
        conn.execute("DROP TABLE segment_members")
        conn.execute("""CREATE TABLE segment_members (
            segment_name TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            PRIMARY KEY (segment_name, customer_id)
        ) WITHOUT ROWID""")
        for name, predicate in definitions:
            cur = conn.execute(
                f"INSERT INTO segment_members (segment_name, customer_id) "  # noqa: S608 - the warehouse's own SQL
                f"SELECT ?, customer_id FROM profiles WHERE ({predicate}) ORDER BY customer_id",
                (name,),
            )
            counts[name] = cur.rowcount
            conn.execute("INSERT INTO segment_refresh_log VALUES (?, ?, ?)", (name, refreshed_at, counts[name]))
    return counts


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no warehouse at {path}: run 'segexport-warehouse build --path {path}' first")
    return path


# --------------------------------------------------------------------------------------------
# Sandbox seed
# --------------------------------------------------------------------------------------------

def _seed_parts(conn: sqlite3.Connection) -> tuple[list, list, Iterator[dict]]:
    mailchimp = [
        {"email_address": email, "status": status,
         "merge_fields": {"FNAME": (first or "")[:255], "LNAME": (last or "")[:255]}}
        for email, status, first, last in conn.execute("""
            SELECT d.email, d.status, p.first_name, p.last_name
            FROM destination_state AS d LEFT JOIN profiles AS p ON p.customer_id = d.customer_id
            WHERE d.destination = 'mailchimp' ORDER BY d.customer_id""")
    ]
    campaign_monitor = [
        {"EmailAddress": email, "Name": " ".join(x for x in (first, last) if x), "State": status}
        for email, status, first, last in conn.execute("""
            SELECT d.email, d.status, p.first_name, p.last_name
            FROM destination_state AS d LEFT JOIN profiles AS p ON p.customer_id = d.customer_id
            WHERE d.destination = 'campaign_monitor' ORDER BY d.customer_id""")
    ]
    contacts = (
        {"contactid": cid, "emailaddress1": email, "firstname": first, "lastname": last, "statecode": state}
        for cid, email, first, last, state in conn.execute(
            "SELECT contactid, email, first_name, last_name, statecode FROM dynamics365_contacts ORDER BY customer_id")
    )
    return mailchimp, campaign_monitor, contacts


#: Campaign starts empty, with the profile field the example sync sets on a contact deleted in Dynamics 365 and
#: the filter the opt-out sync lists changed profiles with (both created by Campaign's administrator in real life)
ADOBE_CAMPAIGN_SEED = {"profiles": [], "profile_fields": {"cusCrmUnlinked": {"type": "boolean"}},
                       "profile_filters": {"byModifiedSince": {"field": "lastModified", "param": "since",
                                                               "operator": ">="}}}


def sandbox_seed(path: str | os.PathLike) -> dict:
    """The seed that makes the sandbox's destinations hold :data:`destination_state` and the contacts.

    ``{"mailchimp": {"members": [...]}, "campaign_monitor": {"subscribers": [...]},
    "dynamics365": {"contacts": [...]}, "adobe_campaign": {"profiles": [], "profile_fields": {...}}}``
    """
    conn = _connect(_existing(path))
    try:
        mailchimp, campaign_monitor, contacts = _seed_parts(conn)
        return {
            "mailchimp": {"members": mailchimp},
            "campaign_monitor": {"subscribers": campaign_monitor},
            "dynamics365": {"contacts": list(contacts)},
            "adobe_campaign": ADOBE_CAMPAIGN_SEED,
        }
    finally:
        conn.close()


def write_sandbox_seed(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """Write :func:`sandbox_seed` as JSON to ``out``, streaming the contacts (bounded memory)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(_existing(path))
    tmp = out.with_name(out.name + ".tmp")
    counts = {"mailchimp": 0, "campaign_monitor": 0, "dynamics365": 0}
    try:
        mailchimp, campaign_monitor, contacts = _seed_parts(conn)
        counts["mailchimp"], counts["campaign_monitor"] = len(mailchimp), len(campaign_monitor)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write('{"mailchimp": ')
            json.dump({"members": mailchimp}, fh, ensure_ascii=False)
            fh.write(', "campaign_monitor": ')
            json.dump({"subscribers": campaign_monitor}, fh, ensure_ascii=False)
            fh.write(', "dynamics365": {"contacts": [')
            for i, contact in enumerate(contacts):
                fh.write(("," if i else "") + "\n" + json.dumps(contact, ensure_ascii=False))
                counts["dynamics365"] += 1
            fh.write(']}, "adobe_campaign": ' + json.dumps(ADOBE_CAMPAIGN_SEED) + '}\n')
        os.replace(tmp, out)
    finally:
        conn.close()
        if tmp.exists():
            tmp.unlink()
    return counts


# --------------------------------------------------------------------------------------------
# Mutations (for delta exports)
# --------------------------------------------------------------------------------------------

def mutate(path: str | os.PathLike, change_fraction: float = 0.01, remove_fraction: float = 0.005,
           seed: int = 1, *, refresh_segments: bool = False) -> dict:
    """Deterministically change profiles, the way a day of activity would.

    - ``change_fraction`` of the profiles get new attribute values (first/last name, loyalty points,
      phone), which may make some *join* a segment (``loyalty_gold``);
    - ``remove_fraction`` of the profiles (others than those) leave one segment they are in, through
      the attribute its predicate uses (``vip_customers``: a refund; ``newsletter_fr``: moved to
      Belgium; ``churn_risk``: ordered again; ``loyalty_gold``: points expired).

    Every touched profile gets a new ``updated_at`` (one hour after the newest one, so successive
    mutations move the watermark forward). Each change is logged in ``profile_changes`` under a new
    ``mutation`` number. Call :func:`refresh` afterwards (or pass ``refresh_segments=True``) to
    update the membership. Returns counts and the customer IDs changed.
    """
    if not (0 <= change_fraction <= 1 and 0 <= remove_fraction <= 1 and change_fraction + remove_fraction <= 1):
        raise ValueError("fractions must be between 0 and 1 and sum to at most 1")
    with _transaction(_existing(path), "BEGIN IMMEDIATE") as conn:
        n = conn.execute("SELECT count(*) FROM profiles").fetchone()[0]
        mutation = conn.execute("SELECT COALESCE(MAX(mutation), 0) + 1 FROM profile_changes").fetchone()[0]
        rng = random.Random(f"segexport-mutate:{seed}:{mutation}")  # the next mutation touches others
        newest = conn.execute("SELECT MAX(updated_at) FROM profiles").fetchone()[0] or f"{REFERENCE_DATE}T00:00:00Z"
        ts = (dt.datetime.strptime(newest, "%Y-%m-%dT%H:%M:%SZ") + dt.timedelta(hours=1)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        k_change, k_remove = round(n * change_fraction), round(n * remove_fraction)
        # About half the profiles are in a segment they can leave: 4x candidates is plenty.
        sampled = rng.sample(range(1, n + 1), min(n, k_change + 4 * k_remove + 1000))

        changed: list[str] = []
        log: list[tuple] = []
        locales = {loc.country: loc for loc in LOCALES}
        to_change = [customer_id(i) for i in sampled[:k_change]]
        countries: dict[str, str] = {}
        for pos in range(0, len(to_change), 500):
            batch = to_change[pos:pos + 500]
            countries.update(conn.execute(
                f"SELECT customer_id, country FROM profiles WHERE customer_id IN ({','.join('?' * len(batch))})",  # noqa: S608
                batch,
            ))
        updates: dict[str, list[tuple]] = {"first_name": [], "last_name": [], "loyalty_points": [], "phone": []}
        for cid in to_change:
            if cid not in countries:
                continue
            loc = locales.get(countries[cid], LOCALES[0])
            fields = rng.sample(list(updates), 1 + int(rng.random() < 0.4))
            for f in sorted(fields):
                if f == "first_name":  # a corrected or preferred name
                    value: Any = loc.first[int(rng.random() * len(loc.first))][0]
                elif f == "last_name":  # married, divorced, corrected
                    value = loc.last[int(rng.random() * len(loc.last))][0]
                elif f == "loyalty_points":  # a purchase
                    value = 10 + int(rng.random() * 490)
                else:  # a new phone number
                    value = loc.phone_template.format(
                        *str(int(rng.random() * loc.phone_space)).zfill(loc.phone_digits))
                updates[f].append((value, ts, cid))
            changed.append(cid)
            log.append((mutation, cid, "changed", ",".join(sorted(fields)), ts))
        for f, rows in updates.items():
            if f == "loyalty_points":
                sql = "UPDATE profiles SET loyalty_points = loyalty_points + ?, updated_at = ? WHERE customer_id = ?"
            else:
                sql = f"UPDATE profiles SET {f} = ?, updated_at = ? WHERE customer_id = ?"  # noqa: S608
            conn.executemany(sql, rows)

        # Leaving segments: candidates in sampled order, each leaves one segment it belongs to.
        leavable = {s["name"]: s["leave"] for s in SEGMENTS if s["leave"]}
        predicates = {name: pred for name, pred in conn.execute(
            "SELECT name, predicate FROM segment_definitions") if name in leavable}
        left: list[str] = []
        candidates = [customer_id(i) for i in sampled[k_change:]]
        pos = 0
        while len(left) < k_remove and pos < len(candidates):
            batch = candidates[pos:pos + 500]
            pos += 500
            marks = ",".join("?" * len(batch))
            member_of: dict[str, list[str]] = {}
            for name in sorted(predicates):
                for (cid,) in conn.execute(
                    f"SELECT customer_id FROM profiles WHERE customer_id IN ({marks}) AND ({predicates[name]})",  # noqa: S608
                    batch,
                ):
                    member_of.setdefault(cid, []).append(name)
            for cid in batch:
                if len(left) >= k_remove:
                    break
                if cid not in member_of:
                    continue
                segs = member_of[cid]
                name = segs[int(rng.random() * len(segs))]
                conn.execute(f"UPDATE profiles SET {leavable[name]}, updated_at = ? WHERE customer_id = ?",  # noqa: S608
                             (ts, cid))
                left.append(cid)
                log.append((mutation, cid, "left_segment", name, ts))
        conn.executemany("INSERT INTO profile_changes VALUES (?, ?, ?, ?, ?)", log)
    result = {"mutation": mutation, "updated_at": ts, "changed": len(changed), "left_segment": len(left),
              "changed_ids": changed, "left_ids": left}
    if refresh_segments:
        result["segments"] = refresh(path)
    return result


# --------------------------------------------------------------------------------------------
# Summary and CLI
# --------------------------------------------------------------------------------------------

def summarize(path: str | os.PathLike) -> dict:
    """Counts: profiles, anomalies by kind, destination state, contacts, segment sizes."""
    conn = _connect(_existing(path))
    try:
        q = conn.execute
        out: dict[str, Any] = {"path": str(path), "profiles": q("SELECT count(*) FROM profiles").fetchone()[0]}
        out["anomalies"] = dict(q("SELECT anomaly, count(*) FROM profile_anomalies GROUP BY anomaly ORDER BY anomaly"))
        out["destination_state"] = {
            f"{d}:{s}": n for d, s, n in q(
                "SELECT destination, status, count(*) FROM destination_state GROUP BY 1, 2 ORDER BY 1, 2")
        }
        out["dynamics365_contacts"] = q("SELECT count(*) FROM dynamics365_contacts").fetchone()[0]
        out["segments"] = dict(q(
            "SELECT segment_name, count(*) FROM segment_members GROUP BY segment_name ORDER BY segment_name"))
        return out
    finally:
        conn.close()


def _print_summary(summary: dict) -> None:
    n = summary["profiles"] or 1
    print(f"warehouse {summary['path']}: {summary['profiles']:,} profiles")
    if "build_seconds" in summary:
        print(f"  built in {summary['build_seconds']:.1f} s")
    print("  anomalies: " + ", ".join(f"{k} {v:,} ({100 * v / n:.2f}%)" for k, v in summary["anomalies"].items()))
    print("  destination state: " + ", ".join(f"{k} {v:,}" for k, v in summary["destination_state"].items()))
    missing = summary["profiles"] - summary["dynamics365_contacts"]
    print(f"  dynamics365 contacts: {summary['dynamics365_contacts']:,} ({missing:,} profiles without one)")
    if summary["segments"]:
        print("  segments: " + ", ".join(f"{k} {v:,} ({100 * v / n:.1f}%)" for k, v in summary["segments"].items()))
    else:
        print("  segments: not refreshed yet")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segexport-warehouse", description="Build and maintain the sample warehouse.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="create the warehouse (replacing it) and materialise the segments")
    b.add_argument("--path", required=True, help="SQLite file to create")
    b.add_argument("--profiles", type=int, default=20_000, help=f"number of profiles (1..{MAX_PROFILES:,})")
    b.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    b.add_argument("--sandbox-seed", default=None, metavar="FILE.json", help="also write the sandbox seed here")
    r = sub.add_parser("refresh", help="re-materialise segment membership")
    r.add_argument("--path", required=True)
    s = sub.add_parser("seed", help="write the sandbox seed JSON")
    s.add_argument("--path", required=True)
    s.add_argument("--out", required=True, metavar="FILE.json")
    m = sub.add_parser("mutate", help="change some profiles (to test delta exports)")
    m.add_argument("--path", required=True)
    m.add_argument("--change-fraction", type=float, default=0.01)
    m.add_argument("--remove-fraction", type=float, default=0.005)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--refresh", action="store_true", help="refresh the segments afterwards")
    sub.add_parser("summary", help="print counts").add_argument("--path", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            summary = build(args.path, args.profiles, args.seed)
            started = time.perf_counter()
            refresh(args.path)
            refresh_s = time.perf_counter() - started
            summary["segments"] = summarize(args.path)["segments"]
            _print_summary(summary)
            print(f"  segments refreshed in {refresh_s:.1f} s")
            if args.sandbox_seed:
                counts = write_sandbox_seed(args.path, args.sandbox_seed)
                print(f"  sandbox seed written to {args.sandbox_seed}: "
                      + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        elif args.command == "refresh":
            started = time.perf_counter()
            counts = refresh(args.path)
            print(f"refreshed {len(counts)} segments in {time.perf_counter() - started:.1f} s: "
                  + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        elif args.command == "seed":
            counts = write_sandbox_seed(args.path, args.out)
            print(f"sandbox seed written to {args.out}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        elif args.command == "mutate":
            result = mutate(args.path, args.change_fraction, args.remove_fraction, args.seed,
                            refresh_segments=args.refresh)
            print(f"mutation {result['mutation']} at {result['updated_at']}: {result['changed']:,} profiles "
                  f"changed, {result['left_segment']:,} left a segment")
            if "segments" in result:
                print("  segments: " + ", ".join(f"{k} {v:,}" for k, v in result["segments"].items()))
        elif args.command == "summary":
            _print_summary(summarize(args.path))
    except (FileNotFoundError, ValueError, sqlite3.Error) as exc:
        print(f"segexport-warehouse: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
