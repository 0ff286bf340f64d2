//! Every rule type of the policy, by example and by property.

use holdpoint_engine::journal::{TimeoutOutcome, Verdict};
use holdpoint_engine::policy::{Condition, Op, Policy, Rule};
use proptest::prelude::*;
use serde_json::json;

fn refunds() -> Policy {
    Policy::new(Verdict::RequireApproval)
        .rule(
            Rule::new("refunds.small", "send_money", Verdict::Allow).when(Condition::compare(
                "amount_cents",
                Op::Le,
                10_000,
            )),
        )
        .rule(Rule::new("refunds.large", "send_money", Verdict::RequireApproval))
        .rule(
            Rule::new("prod.no_delete", "delete_data", Verdict::Deny).when(Condition::compare(
                "table",
                Op::Eq,
                "prod",
            )),
        )
        .rule(Rule::new("unsure", "*", Verdict::RequireApproval).when(Condition::ConfidenceBelow(0.7)))
        .rule(Rule::new("emails", "email_customer", Verdict::Allow))
}

#[test]
fn first_matching_rule_wins_and_says_why() {
    let p = refunds();
    let e = p.evaluate("send_money", &json!({"amount_cents": 5_000}), None);
    assert_eq!(
        (e.verdict, e.rule.as_deref()),
        (Verdict::Allow, Some("refunds.small"))
    );
    let e = p.evaluate("send_money", &json!({"amount_cents": 25_000}), None);
    assert_eq!(
        (e.verdict, e.rule.as_deref()),
        (Verdict::RequireApproval, Some("refunds.large"))
    );
    assert!(e.reason.contains("(rule refunds.large)"), "{}", e.reason);
    let e = p.evaluate("send_money", &json!({"amount_cents": 5_000}), None);
    assert!(e.reason.contains("amount_cents 5000 <= 10000"), "{}", e.reason);
}

#[test]
fn deny_by_string_comparison() {
    let p = refunds();
    let e = p.evaluate("delete_data", &json!({"table": "prod"}), None);
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(e.reason.contains(r#"table "prod" == "prod""#), "{}", e.reason);
    // Another table falls through to the default.
    let e = p.evaluate("delete_data", &json!({"table": "staging"}), None);
    assert_eq!((e.verdict, e.rule), (Verdict::RequireApproval, None));
    assert!(e.reason.contains("no rule matched"));
}

#[test]
fn low_confidence_asks_even_where_the_action_would_be_allowed() {
    let p = refunds();
    assert_eq!(
        p.evaluate("email_customer", &json!({}), Some(0.95)).verdict,
        Verdict::Allow
    );
    let e = p.evaluate("email_customer", &json!({}), Some(0.4));
    assert_eq!(
        (e.verdict, e.rule.as_deref()),
        (Verdict::RequireApproval, Some("unsure"))
    );
    assert!(e.reason.contains("confidence 0.4 < 0.7"), "{}", e.reason);
    // No stated confidence: the confidence rule does not apply.
    assert_eq!(
        p.evaluate("email_customer", &json!({}), None).verdict,
        Verdict::Allow
    );
}

#[test]
fn missing_or_mistyped_args_never_match_a_comparison() {
    let p = refunds();
    for args in [
        json!({}),
        json!({"amount_cents": "5000"}),
        json!(null),
        json!({"amount_cents": null}),
    ] {
        let e = p.evaluate("send_money", &args, None);
        assert_eq!(e.rule.as_deref(), Some("refunds.large"), "{args}");
    }
}

#[test]
fn nested_paths_all_any_and_rust_predicates() {
    let p = Policy::new(Verdict::Allow)
        .rule(
            Rule::new("big-and-foreign", "pay", Verdict::RequireApproval).when(Condition::All(vec![
                Condition::compare("payment.amount", Op::Gt, 100),
                Condition::compare("payment.currency", Op::Ne, "EUR"),
            ])),
        )
        .rule(Rule::new("vip", "pay", Verdict::Deny).when(Condition::Any(vec![
            Condition::compare("to", Op::Eq, "mallory"),
            Condition::custom("recipient on the blocklist", |args, _| {
                args["to"].as_str().is_some_and(|t| t.ends_with(".invalid"))
            }),
        ])));
    let e = p.evaluate(
        "pay",
        &json!({"payment": {"amount": 500, "currency": "USD"}}),
        None,
    );
    assert_eq!(e.verdict, Verdict::RequireApproval);
    assert!(
        e.reason.contains("payment.amount 500 > 100 and payment.currency"),
        "{}",
        e.reason
    );
    assert_eq!(
        p.evaluate(
            "pay",
            &json!({"payment": {"amount": 500, "currency": "EUR"}}),
            None
        )
        .verdict,
        Verdict::Allow
    );
    assert_eq!(
        p.evaluate("pay", &json!({"to": "mallory"}), None).verdict,
        Verdict::Deny
    );
    let e = p.evaluate("pay", &json!({"to": "x.invalid"}), None);
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(e.reason.contains("blocklist"));
    assert_eq!(
        p.evaluate("other", &json!({"to": "mallory"}), None).verdict,
        Verdict::Allow
    );
}

#[test]
fn typed_predicates_read_the_args_into_the_actions_own_type() {
    #[derive(serde::Deserialize)]
    struct Payment {
        amount_cents: u64,
        currency: String,
    }
    let p = Policy::new(Verdict::Allow).rule(Rule::new("fx.large", "pay", Verdict::RequireApproval).when(
        Condition::typed("a large foreign-currency payment", |p: &Payment| {
            p.currency != "EUR" && p.amount_cents > 10_000
        }),
    ));
    let e = p.evaluate("pay", &json!({"amount_cents": 50_000, "currency": "USD"}), None);
    assert_eq!(e.verdict, Verdict::RequireApproval);
    assert!(
        e.reason.contains("a large foreign-currency payment"),
        "{}",
        e.reason
    );
    assert_eq!(
        p.evaluate("pay", &json!({"amount_cents": 50_000, "currency": "EUR"}), None)
            .verdict,
        Verdict::Allow
    );
    // Args that do not read into the type never match.
    assert_eq!(
        p.evaluate("pay", &json!({"amount_cents": "lots"}), None).verdict,
        Verdict::Allow
    );
}

#[test]
fn toml_policy_with_gates_escalation_and_errors() {
    let p = Policy::from_toml(
        r#"
default = "deny"

[[rule]]
name = "refunds.small"
action = "send_money"
when = { arg = "amount_cents", op = "<=", value = 10000 }
verdict = "allow"

[[rule]]
name = "refunds.large"
action = "send_money"
verdict = "require-approval"
roles = ["team-lead"]
quorum = 2
timeout_secs = 3600
escalate = [{ roles = ["finance"], timeout_secs = 7200 }]
on_timeout = "reject"
decisions = ["approve", "reject"]

[[rule]]
name = "unsure"
action = "*"
when = { any = [{ confidence_below = 0.5 }, { arg = "risky", op = "==", value = true }] }
verdict = "require-approval"
"#,
    )
    .unwrap();
    assert_eq!(p.default, Verdict::Deny);
    let e = p.evaluate("send_money", &json!({"amount_cents": 20_000}), None);
    assert_eq!(e.verdict, Verdict::RequireApproval);
    assert_eq!(e.gate.quorum, 2);
    assert_eq!(e.gate.levels.len(), 2);
    assert_eq!(e.gate.levels[0].roles, vec!["team-lead".to_string()]);
    assert_eq!(e.gate.levels[1].timeout_secs, Some(7200));
    assert_eq!(e.gate.on_timeout, TimeoutOutcome::Reject);
    use holdpoint_engine::journal::DecisionKind;
    assert_eq!(e.gate.allowed, vec![DecisionKind::Approve, DecisionKind::Reject]);
    assert_eq!(
        p.evaluate("x", &json!({"risky": true}), None).rule.as_deref(),
        Some("unsure")
    );
    assert_eq!(
        p.evaluate("x", &json!({}), Some(0.2)).rule.as_deref(),
        Some("unsure")
    );
    assert_eq!(p.evaluate("x", &json!({}), Some(0.9)).verdict, Verdict::Deny);

    for bad in [
        "[[rule]]\nname = \"a\"\naction = \"*\"\nverdict = \"maybe\"",
        "[[rule]]\nname = \"a\"\naction = \"*\"\nverdict = \"allow\"\nquorum = 0",
        "[[rule]]\nname = \"a\"\naction = \"*\"\nverdict = \"allow\"\nwhen = { confidence_below = 3.0 }",
        "[[rule]]\nname = \"a\"\naction = \"*\"\nverdict = \"allow\"\nwhen = { arg = \"x\", op = \"=~\", value = 1 }",
        "[[rule]]\nname = \"a\"\naction = \"*\"\nverdict = \"allow\"\nsurprise = 1",
    ] {
        assert!(Policy::from_toml(bad).is_err(), "accepted: {bad}");
    }
}

proptest! {
    /// A threshold rule splits amounts exactly at the threshold.
    #[test]
    fn threshold_rules_split_exactly(amount in 0u64..1_000_000, threshold in 0u64..1_000_000) {
        let p = Policy::new(Verdict::RequireApproval)
            .rule(Rule::new("small", "pay", Verdict::Allow).when(Condition::compare("amount", Op::Le, threshold)));
        let e = p.evaluate("pay", &json!({"amount": amount}), None);
        prop_assert_eq!(e.verdict == Verdict::Allow, amount <= threshold);
    }

    /// Confidence rules ask exactly below the threshold, and never without a stated confidence.
    #[test]
    fn confidence_rules_ask_exactly_below(c in 0.0f64..1.0, t in 0.0f64..1.0) {
        let p = Policy::new(Verdict::Allow)
            .rule(Rule::new("unsure", "*", Verdict::RequireApproval).when(Condition::ConfidenceBelow(t)));
        prop_assert_eq!(p.evaluate("a", &json!({}), Some(c)).verdict == Verdict::RequireApproval, c < t);
        prop_assert_eq!(p.evaluate("a", &json!({}), None).verdict, Verdict::Allow);
    }

    /// Every comparison operator agrees with Rust's on numbers.
    #[test]
    fn comparisons_agree_with_rust(a in -1000i64..1000, b in -1000i64..1000) {
        for (op, want) in [(Op::Lt, a < b), (Op::Le, a <= b), (Op::Gt, a > b), (Op::Ge, a >= b), (Op::Eq, a == b), (Op::Ne, a != b)] {
            let c = Condition::compare("x", op, b);
            prop_assert_eq!(c.check(&json!({"x": a}), None).is_some(), want, "{} {} {}", a, op, b);
        }
    }

    /// Rule order decides: the verdict is the first matching rule's.
    #[test]
    fn first_match_decides(verdicts in proptest::collection::vec(0u8..3, 1..6), matching in proptest::collection::vec(any::<bool>(), 6)) {
        let to_verdict = |v: u8| [Verdict::Allow, Verdict::Deny, Verdict::RequireApproval][v as usize];
        let mut p = Policy::new(Verdict::Deny);
        for (i, v) in verdicts.iter().enumerate() {
            let cond = if matching[i] { Condition::Always } else { Condition::compare("never", Op::Eq, 1) };
            p = p.rule(Rule::new(&format!("r{i}"), "*", to_verdict(*v)).when(cond));
        }
        let e = p.evaluate("a", &json!({}), None);
        match (0..verdicts.len()).find(|&i| matching[i]) {
            Some(i) => {
                let name = format!("r{i}");
                prop_assert_eq!(e.rule.as_deref(), Some(name.as_str()));
                prop_assert_eq!(e.verdict, to_verdict(verdicts[i]));
            }
            None => prop_assert_eq!((e.verdict, e.rule), (Verdict::Deny, None)),
        }
    }
}

mod trust {
    use super::*;
    use holdpoint_engine::journal::{DecisionKind, GateId, Principal, RuleDecision, RunId};

    fn d(kind: DecisionKind, by: &str) -> RuleDecision {
        RuleDecision {
            auto: false,
            kind,
            by: Principal::new(by),
            at: chrono::Utc::now(),
            run: RunId::new(),
            gate: GateId(1),
        }
    }

    fn policy() -> Policy {
        Policy::new(Verdict::RequireApproval)
            .rule(Rule::new("payouts", "pay", Verdict::RequireApproval).trust_after(3))
    }

    fn verdict(history: &[RuleDecision]) -> Verdict {
        policy()
            .evaluate("pay", &json!({}), None)
            .with_trust(history)
            .verdict
    }

    #[test]
    fn grows_after_n_unchanged_approvals_by_distinct_reviewers() {
        use DecisionKind::*;
        assert_eq!(
            verdict(&[d(Approve, "a"), d(Approve, "b"), d(Approve, "c")]),
            Verdict::Allow
        );
        let e = policy().evaluate("pay", &json!({}), None).with_trust(&[
            d(Approve, "a"),
            d(Approve, "b"),
            d(Approve, "c"),
        ]);
        assert!(
            e.reason
                .starts_with("trusted: the last 3 requests under rule payouts"),
            "{}",
            e.reason
        );
        // Older history beyond the last n does not matter.
        assert_eq!(
            verdict(&[d(Approve, "a"), d(Approve, "b"), d(Approve, "c"), d(Reject, "x")]),
            Verdict::Allow
        );
    }

    #[test]
    fn any_edit_reject_or_timeout_in_the_streak_asks_again() {
        use DecisionKind::*;
        for breaker in [
            d(Edit, "c"),
            d(Reject, "c"),
            d(Reject, "system"),
            d(Approve, "system"),
        ] {
            assert_eq!(
                verdict(&[d(Approve, "a"), d(Approve, "b"), breaker.clone()]),
                Verdict::RequireApproval,
                "{breaker:?}"
            );
            assert_eq!(
                verdict(&[breaker.clone(), d(Approve, "a"), d(Approve, "b")]),
                Verdict::RequireApproval
            );
        }
    }

    fn auto() -> RuleDecision {
        RuleDecision {
            auto: true,
            ..d(DecisionKind::Approve, "system")
        }
    }

    #[test]
    fn trust_covers_fewer_than_n_automatic_runs_then_asks_for_a_spot_check() {
        use DecisionKind::*;
        let earned = [d(Approve, "a"), d(Approve, "b"), d(Approve, "c")];
        let with_autos = |k: usize| {
            let mut h: Vec<RuleDecision> = (0..k).map(|_| auto()).collect();
            h.extend(earned.iter().cloned());
            h
        };
        assert_eq!(verdict(&with_autos(1)), Verdict::Allow);
        assert_eq!(verdict(&with_autos(2)), Verdict::Allow);
        assert_eq!(verdict(&with_autos(3)), Verdict::RequireApproval, "spot check");
        // The spot check approved by someone new keeps the streak: trusted again.
        let mut h = vec![d(Approve, "d")];
        h.extend(with_autos(3));
        assert_eq!(verdict(&h), Verdict::Allow);
        // An edit at the spot check takes the trust away.
        let mut h = vec![d(Edit, "d")];
        h.extend(with_autos(3));
        assert_eq!(verdict(&h), Verdict::RequireApproval);
    }

    #[test]
    fn the_same_reviewer_twice_or_too_short_a_history_does_not_count() {
        use DecisionKind::*;
        assert_eq!(
            verdict(&[d(Approve, "a"), d(Approve, "a"), d(Approve, "b")]),
            Verdict::RequireApproval
        );
        assert_eq!(
            verdict(&[d(Approve, "a"), d(Approve, "b")]),
            Verdict::RequireApproval
        );
        assert_eq!(verdict(&[]), Verdict::RequireApproval);
    }

    #[test]
    fn rules_without_trust_are_never_relaxed() {
        use DecisionKind::*;
        let p =
            Policy::new(Verdict::RequireApproval).rule(Rule::new("strict", "pay", Verdict::RequireApproval));
        let e = p.evaluate("pay", &json!({}), None).with_trust(&[
            d(Approve, "a"),
            d(Approve, "b"),
            d(Approve, "c"),
        ]);
        assert_eq!(e.verdict, Verdict::RequireApproval);
        let toml = Policy::from_toml(
            "[[rule]]\nname = \"p\"\naction = \"pay\"\nverdict = \"require-approval\"\ntrust_after = 2",
        )
        .unwrap();
        assert_eq!(toml.rules[0].trust_after, Some(2));
    }
}

#[test]
fn the_shipped_example_policy_parses_and_means_what_it_says() {
    let p = Policy::from_toml(include_str!("../../examples/policy.toml")).unwrap();
    let v = |action: &str, args: serde_json::Value| p.evaluate(action, &args, None);
    assert_eq!(
        v("send_money", json!({"amount_cents": 900, "to": "a"})).verdict,
        Verdict::Allow
    );
    assert_eq!(
        v("send_money", json!({"amount_cents": 50_000, "to": "mallory"})).verdict,
        Verdict::Deny
    );
    let large = v("send_money", json!({"amount_cents": 250_000, "to": "a"}));
    assert_eq!(
        (large.rule.as_deref(), large.gate.quorum),
        (Some("refunds.large"), 2)
    );
    let medium = v("send_money", json!({"amount_cents": 50_000, "to": "a"}));
    assert_eq!(
        (medium.rule.as_deref(), medium.trust_after),
        (Some("refunds.medium"), Some(5))
    );
    assert_eq!(v("delete_data", json!({"table": "prod"})).verdict, Verdict::Deny);
}
