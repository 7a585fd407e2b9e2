"""`make demo`: the shipped programmes' sample baskets explained; a lane at work; a store syncing with head office.

Each programme's samples live in config/samples/<ruleset id>/ with a
scenarios.json listing the baskets and members to price.  The second part
(scripts/demo_lane.py) starts a real lane agent and plays a till against its
POS API.  The third (scripts/demo_chain.py) starts a broker, head office and
three lanes that sell and sync for DURATION seconds (default 30; 0 keeps them
running).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agent.basket import parse_basket, parse_member
from agent.engine import price
from agent.errors import InputError
from agent.money import format_fen
from agent.render import explain
from agent.ruleset import load_ruleset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import demo_chain  # noqa: E402 - beside this script, not a package
import demo_lane  # noqa: E402


def main() -> int:
    rules_dir = ROOT / "config" / "rules"
    samples_dir = ROOT / "config" / "samples"
    total_baskets = 0
    for rules_path in sorted(rules_dir.glob("*.toml")):
        ruleset = load_ruleset(rules_path)
        scenarios_path = samples_dir / ruleset.id / "scenarios.json"
        print(f"\n=== {ruleset.name.zh_cn} / {ruleset.name.en}  ({rules_path.relative_to(ROOT)}, v{ruleset.version})")
        if not scenarios_path.exists():
            print("  (no sample baskets)")
            continue
        for scenario in json.loads(scenarios_path.read_text(encoding="utf-8")):
            basket_file = scenarios_path.parent / scenario["basket"]
            basket = parse_basket(json.loads(basket_file.read_text(encoding="utf-8")), source=str(basket_file))
            member = None
            if scenario.get("member"):
                member_file = scenarios_path.parent / scenario["member"]
                member = parse_member(json.loads(member_file.read_text(encoding="utf-8")), source=str(member_file))
            print(f"\n--- {scenario['title_zh']} / {scenario['title_en']}")
            try:
                priced = price(basket, member, ruleset)
            except InputError as exc:
                # A scenario may show a refusal on purpose (e.g. too many points).
                print(f"refused: {exc}")
                continue
            print(explain(priced))
            print(f"(saved {format_fen(priced.discount_fen)}, {priced.points} points)")
            total_baskets += 1
    print(f"\npriced {total_baskets} sample baskets.  Rules: docs/rules.md   POS API: docs/pos-api.md")
    print("try: .venv/bin/lane-agent price --rules config/rules/888-mall.toml --basket <basket.json> --explain")
    code = demo_lane.main()
    return code or demo_chain.main()


if __name__ == "__main__":
    sys.exit(main())
