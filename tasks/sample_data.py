"""A seeded synthetic ad market in adrank's log contract: the embedded default data.

Users have demographics, hidden interests in products (a few topics, correlated with occupation, and within
each topic one or two of its products) and a profile column of recent web searches drawn from those
interests, in words of their own (never the ads' products, brands or the topic's name); ads have
natural-language copy about one product of one topic (`category`, the advertiser's coarse label); a click
is drawn from a logistic model of interest <-> the ad's product, ad quality, position bias and noise. New
ads appear on each of the last `cold_start_days` days (cold start), so only their text says whom they
suit. docs/data.md states the click model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import SampleDataConfig
from tasks.folders import replaced_whole

# topic -> (advertisers, products, selling points)
TOPICS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "travel": (
        ["Wanderly Travel", "SkyHop Airlines"],
        ["weekend getaway to Lisbon", "all-inclusive beach resort", "mountain cabin escape", "rail pass across Europe"],
        ["Free cancellation up to 48 hours before you go.", "Pack light, fly cheap, stay longer."],
    ),
    "fitness": (
        ["PulseFit", "IronLeaf Gym"],
        ["home kettlebell set", "30-day running plan", "smart fitness tracker", "yoga mat with alignment lines"],
        ["Build strength in 20 minutes a day.", "Coaches who keep you on track."],
    ),
    "gaming": (
        ["PixelForge", "Nova Arcade"],
        ["mechanical gaming keyboard", "open-world fantasy RPG", "wireless controller", "144 Hz gaming monitor"],
        ["Lower latency, higher scores.", "Join millions of players online tonight."],
    ),
    "cooking": (
        ["Hearth & Pan", "FreshCrate"],
        ["cast-iron skillet", "weekly meal kit", "chef's knife set", "sourdough starter kit"],
        ["Restaurant flavour in your own kitchen.", "Fresh ingredients delivered to your door."],
    ),
    "finance": (
        ["Ledgerly Bank", "Summit Invest"],
        ["high-interest savings account", "low-fee index fund", "budgeting app", "no-annual-fee credit card"],
        ["Your money working while you sleep.", "Open an account in five minutes."],
    ),
    "fashion": (
        ["Thread & Co", "Urban Loom"],
        ["linen summer dress", "leather ankle boots", "tailored wool coat", "vintage denim jacket"],
        ["New season styles, free returns.", "Look sharp without the designer price."],
    ),
    "pets": (
        ["Pawsome Supply", "Whisker Works"],
        ["grain-free dog food", "self-cleaning litter box", "orthopedic dog bed", "interactive cat toy"],
        ["Happy pets, healthy pets.", "Vet-approved and delivered monthly."],
    ),
    "parenting": (
        ["LittleSteps", "Nest Nursery"],
        ["convertible baby stroller", "organic baby formula", "wooden learning toys", "toddler car seat"],
        ["Safety-tested for your little ones.", "Trusted by parents everywhere."],
    ),
    "outdoors": (
        ["TrailCraft", "Summit Gear"],
        ["ultralight hiking tent", "waterproof trail boots", "camping stove", "climbing harness"],
        ["Built for the backcountry.", "Gear that goes where you go."],
    ),
    "music": (
        ["Resonance Audio", "Chordline"],
        ["noise-cancelling headphones", "beginner acoustic guitar", "vinyl record player", "online piano lessons"],
        ["Hear every note the way it was meant.", "Start playing your favourite songs this week."],
    ),
    "home": (
        ["Nestwell Home", "Brightside Living"],
        ["robot vacuum cleaner", "memory foam mattress", "smart thermostat", "linen bedding set"],
        ["Make your home the best place to be.", "Sleep better, live better."],
    ),
    "tech": (
        ["Circuit Labs", "Quanta Devices"],
        ["ultrathin laptop", "cloud backup plan", "noise-free mechanical mouse", "4K webcam for meetings"],
        ["Fast, secure and built to last.", "Upgrade the way you work."],
    ),
}
HOOKS = ["Discover the", "Meet the", "Try our", "Save on the", "Introducing the", "Get the"]
# product -> what people who want it search for: their words, never the ads' (products, brands, topics)
SEARCHES: dict[str, list[str]] = {
    "weekend getaway to Lisbon": [
        "things to do in porto",
        "best pastel de nata in portugal",
        "short city break in spring",
    ],
    "all-inclusive beach resort": [
        "best time to visit the algarve",
        "sunbathing holidays with a kids club",
        "hotel where every drink is included",
    ],
    "mountain cabin escape": [
        "log fire lodge in the alps",
        "snowy retreat with a hot tub",
        "remote chalet for a quiet week",
    ],
    "rail pass across Europe": [
        "train or plane to paris",
        "sleeper train to venice",
        "scenic train journeys through the alps",
    ],
    "home kettlebell set": [
        "how to do a proper squat",
        "strength workout in the spare room",
        "swing exercise for glutes",
    ],
    "30-day running plan": ["couch to 5k week one", "how to pace a first marathon", "shin splints after jogging"],
    "smart fitness tracker": [
        "how many steps should i walk",
        "what is a normal resting heart rate",
        "count calories burned on a walk",
    ],
    "yoga mat with alignment lines": [
        "stretches for lower back pain",
        "pilates or stretching for flexibility",
        "sun salutation hurts my wrists",
    ],
    "mechanical gaming keyboard": ["best switches for typing fast", "keys double typing fix", "rgb keycaps worth it"],
    "open-world fantasy RPG": ["elden ring boss guide", "games like skyrim", "best quests in witcher 3"],
    "wireless controller": [
        "gamepad drift on the left stick",
        "co-op games to play with friends on the sofa",
        "bluetooth pad not pairing",
    ],
    "144 Hz gaming monitor": [
        "best fps settings",
        "screen tearing in shooters",
        "is 60 fps enough for competitive play",
    ],
    "cast-iron skillet": [
        "crispy sear on a steak",
        "heavy cookware that lasts a lifetime",
        "restore a rusty heirloom fryer",
    ],
    "weekly meal kit": [
        "easy weeknight dinner recipes",
        "what to cook when too tired to shop",
        "dinner ideas for busy families",
    ],
    "chef's knife set": ["best way to sharpen knives", "how to dice an onion fast", "whetstone or honing rod"],
    "sourdough starter kit": ["how to make bread rise", "homemade pizza dough", "feeding a levain every morning"],
    "high-interest savings account": [
        "isa allowance this year",
        "where to park emergency cash",
        "beat inflation with my cash",
    ],
    "low-fee index fund": ["what is an etf", "how much to save for retirement", "compound growth calculator"],
    "budgeting app": ["track my spending each month", "how to pay off debt fast", "50 30 20 rule explained"],
    "no-annual-fee credit card": [
        "points and cashback on purchases",
        "raise my borrowing score",
        "contactless spending abroad without charges",
    ],
    "linen summer dress": ["what to wear to a wedding", "light outfits for a heatwave", "floral frocks for holidays"],
    "leather ankle boots": ["autumn outfit ideas", "suede or calfskin footwear", "heeled shoes that go with jeans"],
    "tailored wool coat": [
        "what goes with a trench",
        "warm outerwear for the office",
        "winter overcoat that fits well",
    ],
    "vintage denim jacket": ["capsule wardrobe basics", "thrift finds from the 90s", "how to style white sneakers"],
    "grain-free dog food": [
        "puppy allergy symptoms",
        "kibble without wheat",
        "best diet for a labrador with a sensitive stomach",
    ],
    "self-cleaning litter box": ["kitten tray smells", "how often to change kitty sand", "scooping less often"],
    "orthopedic dog bed": ["old labrador stiff joints", "adopt a rescue greyhound", "arthritis in an older hound"],
    "interactive cat toy": ["why does my kitten scratch the sofa", "bored indoor kitten", "how to tire out a kitten"],
    "convertible baby stroller": ["pram that folds one handed", "pushchair for city pavements", "best buggy for twins"],
    "organic baby formula": [
        "weaning first purees",
        "switching from breastfeeding to bottles",
        "how much milk does a newborn drink",
    ],
    "wooden learning toys": [
        "montessori activities for a two year old",
        "educational play ideas for preschoolers",
        "stacking and counting games",
    ],
    "toddler car seat": ["rear facing until what age", "isofix installation guide", "is a second hand booster safe"],
    "ultralight hiking tent": [
        "rules for overnight stays in the hills",
        "wild pitching in scotland",
        "lightest shelter for backpacking",
    ],
    "waterproof trail boots": ["easy hikes near me", "national park trails", "blisters on long walks"],
    "camping stove": ["boil water at a campsite", "cook a hot breakfast in the wild", "gas canister for backpacking"],
    "climbing harness": ["bouldering for beginners", "top rope knots", "indoor wall belay course"],
    "noise-cancelling headphones": [
        "block out office chatter",
        "quiet commute on the tube",
        "silence for long flights",
    ],
    "beginner acoustic guitar": [
        "learn ukulele chords quickly",
        "strumming patterns for pop songs",
        "first chords to learn on six strings",
    ],
    "vinyl record player": ["best albums of the year", "where to buy lps second hand", "turntable needle replacement"],
    "online piano lessons": [
        "how to read notes on a stave",
        "jazz standards to learn",
        "learn to play chopin as an adult",
    ],
    "robot vacuum cleaner": [
        "hair on the rug every evening",
        "declutter lounge ideas",
        "dusty floors despite sweeping",
    ],
    "memory foam mattress": [
        "cannot fall asleep at night",
        "waking up with a sore back",
        "sinking in the middle when lying down",
    ],
    "smart thermostat": ["cut heating bills", "draughty house in winter", "control radiators from my phone"],
    "linen bedding set": ["cosy bedroom ideas", "cotton or bamboo sheets", "duvet covers that stay cool"],
    "ultrathin laptop": [
        "notebook battery drains quickly",
        "lightest computer for commuting",
        "speed up a slow computer",
    ],
    "cloud backup plan": ["how to back up photos", "lost files after a crash", "keep files safe if my computer dies"],
    "noise-free mechanical mouse": [
        "wrist pain from clicking",
        "quiet clicks for a shared office",
        "ergonomic pointer for the desk",
    ],
    "4K webcam for meetings": ["video call looks blurry", "look better on zoom", "camera for streaming from a desk"],
}
SEARCHES_PER_USER = 3
OFF_INTEREST_SEARCH_SHARE = 0.2  # searches about a random product: people search for more than they buy
# a user who likes a topic likes one or two of its products; the topic's other products interest them this much
LIKED_PRODUCTS_PER_TOPIC = (1, 2)
SIBLING_PRODUCT_INTEREST = 0.1
# (topic, product): what a user's interest and an ad are about; `category` names only the topic
PRODUCTS: list[tuple[str, str]] = [
    (topic, product) for topic, (_, products, _) in TOPICS.items() for product in products
]

# occupation -> topics it leans towards; the hidden interests draw from these
OCCUPATIONS: dict[str, list[str]] = {
    "software engineer": ["tech", "gaming", "finance"],
    "student": ["gaming", "music", "fashion"],
    "nurse": ["fitness", "parenting", "home"],
    "teacher": ["parenting", "cooking", "travel"],
    "chef": ["cooking", "home", "travel"],
    "accountant": ["finance", "home", "tech"],
    "designer": ["fashion", "music", "travel"],
    "retiree": ["travel", "home", "pets"],
    "park ranger": ["outdoors", "pets", "fitness"],
    "musician": ["music", "tech", "fashion"],
}
# the click model (docs/data.md): logit = CLICK_INTERCEPT + INTEREST_WEIGHT x interest(user, ad's product)
# + quality(ad) - POSITION_PENALTY x (position - 1) + noise
CLICK_INTERCEPT = -2.3
INTEREST_WEIGHT = 6.0
POSITION_PENALTY = 0.3
AD_QUALITY_SD = 0.4
CLICK_NOISE_SD = 0.3
CITIES = ["London", "Manchester", "Leeds", "Bristol", "Glasgow", "Cardiff", "Belfast", "Brighton"]


@dataclass(frozen=True)
class SampleMarket:
    ads: pa.Table
    users: pa.Table
    impressions: pa.Table  # the log contract's columns and `date` (the partition)
    # impression_id, interest, ad_quality, position: the click model's terms of each impression, noise aside.
    # Never written to the logs: what no model can see, for benchmarks/sample_ceiling.py
    click_terms: pa.Table


def sample_market(config: SampleDataConfig) -> SampleMarket:
    """The seeded market: its three tables and the hidden terms of each impression's click."""
    rng = np.random.default_rng(config.seed)
    topics = list(TOPICS)
    ads, ad_products = _make_ads(config, rng, topics)
    users, interests = _make_users(config, rng, topics)
    impressions = _make_impressions(config, rng, ads, ad_products, users, interests, topics)
    hidden = ["interest", "ad_quality"]
    click_terms = impressions.select(["impression_id", *hidden, "position"])
    return SampleMarket(ads, users, impressions.drop_columns(hidden), click_terms)


def click_logit(
    interest: np.ndarray | float, ad_quality: np.ndarray | float, position: np.ndarray | int
) -> np.ndarray | float:
    """The click model's log-odds, noise aside (numpy arrays or scalars)."""
    return CLICK_INTERCEPT + INTEREST_WEIGHT * interest + ad_quality - POSITION_PENALTY * (position - 1)


def generate_sample_logs(config: SampleDataConfig, out_dir: Path, default_dir: Path | None = None) -> dict[str, int]:
    """Write impressions/ (hive-partitioned by date), ads/ and users/ as Parquet under out_dir.

    Written to a fresh temporary sibling folder and renamed, so a crash never leaves half a data set.
    An existing out_dir is replaced only if it is empty, is default_dir (the configured default) or holds
    tasks/folders.py's marker: real logs pointed at by data.logs are never overwritten. Returns row counts per table.
    """
    market = sample_market(config)
    with replaced_whole(out_dir, default_dir) as tmp_dir:
        for table_name, table in (("ads", market.ads), ("users", market.users)):
            (tmp_dir / table_name).mkdir(parents=True)
            pq.write_table(table, tmp_dir / table_name / "part-0.parquet")
        pq.write_to_dataset(
            market.impressions,
            tmp_dir / "impressions",
            partition_cols=["date"],
            basename_template="part-{i}.parquet",
        )
    return {"impressions": market.impressions.num_rows, "ads": market.ads.num_rows, "users": market.users.num_rows}


def _make_ads(config: SampleDataConfig, rng: np.random.Generator, topics: list[str]) -> tuple[pa.Table, np.ndarray]:
    """The ads table and each ad's index in PRODUCTS."""
    start = datetime.combine(config.start_date, time())
    first_cold_day = max(0, config.days - config.cold_start_days)
    n_cold = max(1, config.ads // 4)
    advertiser_topics = [topics[i % len(topics)] for i in range(config.advertisers)]
    rows: dict[str, list] = {
        k: [] for k in ("ad_id", "title", "description", "category", "advertiser", "bid", "active", "created_at")
    }
    ad_products = np.zeros(config.ads, dtype=int)
    for i in range(config.ads):
        topic = advertiser_topics[i % config.advertisers]
        advertisers, products, pitches = TOPICS[topic]
        advertiser = advertisers[(i // config.advertisers) % len(advertisers)]
        product = products[rng.integers(len(products))]
        ad_products[i] = PRODUCTS.index((topic, product))
        is_cold = i >= config.ads - n_cold
        # established ads predate the log; cold-start ones appear during its last days
        created_days = rng.integers(first_cold_day, config.days) if is_cold else -rng.integers(1, 60)
        rows["ad_id"].append(f"ad{i:04d}")
        rows["title"].append(f"{HOOKS[rng.integers(len(HOOKS))]} {product} from {advertiser}")
        rows["description"].append(str(pitches[rng.integers(len(pitches))]))
        rows["category"].append(topic)
        rows["advertiser"].append(advertiser)
        rows["bid"].append(round(float(rng.uniform(0.2, 2.0)), 2))
        rows["active"].append(bool(rng.random() > 0.05) or is_cold or i == 0)  # ad 0: never an empty market
        rows["created_at"].append(start + timedelta(days=int(created_days), hours=int(rng.integers(0, 12))))
    return pa.table(rows), ad_products


def _make_users(config: SampleDataConfig, rng: np.random.Generator, topics: list[str]) -> tuple[pa.Table, np.ndarray]:
    occupations = list(OCCUPATIONS)
    interests = np.zeros((config.users, len(PRODUCTS)))  # (users, products), in [0, 1]
    rows: dict[str, list] = {k: [] for k in ("user_id", "age", "gender", "city", "occupation", "recent_searches")}
    for u in range(config.users):
        occupation = occupations[rng.integers(len(occupations))]
        age = int(np.clip(rng.normal(40 if occupation != "retiree" else 70, 12), 18, 90))
        if occupation == "student":
            age = int(rng.integers(18, 26))
        leaning = [topics.index(t) for t in OCCUPATIONS[occupation]]
        # two topics from the occupation's leaning, one at random: demographics hint, history tells
        chosen = list(dict.fromkeys([*rng.choice(leaning, size=2, replace=False), rng.integers(len(topics))]))
        for topic, weight in zip(chosen, rng.dirichlet(np.ones(len(chosen))), strict=True):
            in_topic = [p for p, (t, _) in enumerate(PRODUCTS) if t == topics[topic]]
            liked = rng.choice(
                in_topic, size=rng.integers(LIKED_PRODUCTS_PER_TOPIC[0], LIKED_PRODUCTS_PER_TOPIC[1] + 1)
            )
            interests[u, in_topic] = weight * SIBLING_PRODUCT_INTEREST
            interests[u, liked] = weight
        rows["user_id"].append(f"u{u:05d}")
        rows["age"].append(age)
        rows["gender"].append(str(rng.choice(["female", "male", "non-binary"], p=[0.49, 0.49, 0.02])))
        rows["city"].append(CITIES[rng.integers(len(CITIES))])
        rows["occupation"].append(occupation)
        rows["recent_searches"].append(_searches(rng, interests[u]))
    return pa.table(rows), interests


def _searches(rng: np.random.Generator, interests: np.ndarray) -> str:
    """SEARCHES_PER_USER distinct searches, each about a product drawn by the user's interests (or, with
    OFF_INTEREST_SEARCH_SHARE, any product)."""
    chosen: list[str] = []
    while len(chosen) < SEARCHES_PER_USER:
        off_interest = rng.random() < OFF_INTEREST_SEARCH_SHARE
        drawn = (
            rng.integers(len(PRODUCTS)) if off_interest else rng.choice(len(PRODUCTS), p=interests / interests.sum())
        )
        searches = SEARCHES[PRODUCTS[drawn][1]]
        search = searches[rng.integers(len(searches))]
        if search not in chosen:
            chosen.append(search)
    return "; ".join(chosen)


def _make_impressions(
    config: SampleDataConfig,
    rng: np.random.Generator,
    ads: pa.Table,
    ad_products: np.ndarray,
    users: pa.Table,
    interests: np.ndarray,
    topics: list[str],
) -> pa.Table:
    start = datetime.combine(config.start_date, time())
    leanings = [[topics.index(t) for t in OCCUPATIONS[o]] for o in users["occupation"].to_pylist()]
    ad_ids = ads["ad_id"].to_pylist()
    ad_topic = np.array([topics.index(t) for t in ads["category"].to_pylist()])
    ad_quality = rng.normal(0.0, AD_QUALITY_SD, size=len(ad_ids))
    created = np.array([(c - start).total_seconds() for c in ads["created_at"].to_pylist()])
    active = np.array(ads["active"].to_pylist())
    columns = ("impression_id", "ts", "user_id", "ad_id", "clicked", "position", "date", "interest", "ad_quality")
    rows: dict[str, list] = {k: [] for k in columns}
    for day in range(config.days):
        for u in range(interests.shape[0]):
            for _ in range(rng.poisson(config.requests_per_user_day)):
                second = day * 86400 + int(rng.integers(0, 86400))
                eligible = active & (created <= second)
                pools = (  # (slots' share, ads): new ads explored, occupation targeted, else any eligible ad
                    (config.exploration_share, eligible & (created > second - config.exploration_days * 86400)),
                    (config.targeted_share, eligible & np.isin(ad_topic, leanings[u])),
                )
                ts = start + timedelta(seconds=second)
                for position in range(1, config.ads_per_request + 1):
                    a = _pick_ad(rng, pools, eligible)
                    if a is None:  # fewer eligible ads than slots
                        break
                    eligible[a] = False  # one request shows an ad once
                    # click model: interest in the ad's product dominates; position and quality shift it
                    interest = float(interests[u, ad_products[a]])
                    logit = click_logit(interest, ad_quality[a], position) + rng.normal(0.0, CLICK_NOISE_SD)
                    rows["impression_id"].append(len(rows["impression_id"]) + 1)
                    rows["ts"].append(ts)
                    rows["user_id"].append(f"u{u:05d}")
                    rows["ad_id"].append(ad_ids[a])
                    rows["clicked"].append(bool(rng.random() < 1.0 / (1.0 + np.exp(-logit))))
                    rows["position"].append(position)
                    rows["date"].append(ts.date().isoformat())
                    rows["interest"].append(interest)
                    rows["ad_quality"].append(float(ad_quality[a]))
    return pa.table(rows)


def _pick_ad(rng: np.random.Generator, pools: tuple[tuple[float, np.ndarray], ...], eligible: np.ndarray) -> int | None:
    """One slot's ad: from the first pool whose share the slot draws and that still holds an eligible ad, else
    from every eligible ad; None when none is left."""
    for share, pool in pools:
        left = pool & eligible
        if rng.random() < share and left.any():
            return int(rng.choice(np.flatnonzero(left)))
    return int(rng.choice(np.flatnonzero(eligible))) if eligible.any() else None
