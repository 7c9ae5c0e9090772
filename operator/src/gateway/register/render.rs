//! Register data to HTML, pure: [`page`] turns [`Register`]s and a language
//! into display values (localized words and numbers, bar widths, chart
//! points) and renders `templates/register.html` with minijinja, which
//! escapes every value. No JavaScript; the CSS is inline in the page.
//!
//! A bar's track spans 0 to `max(suspendAt, 100)` percent of the stint, so
//! a member past their stint is still drawn to scale up to suspension; tick
//! marks show the warn and throttle thresholds and the stint itself.

use std::sync::OnceLock;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use minijinja::{AutoEscape, Environment};
use serde::Serialize;

use super::i18n::{Lang, Text, fill};
use super::view::{BudgetLine, MemberLine, PowerPoint, Register};
use crate::resources::stint_quota::MemberState;
use crate::resources::time::time_zone;

/// Why a page could not be rendered (a template fault: a bug, not input).
#[derive(Debug, thiserror::Error)]
#[error("rendering the register page: {0}")]
pub struct RenderError(#[from] minijinja::Error);

/// What the page offers besides the registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    /// A member's key is in use: offer "forget my key".
    pub signed_in: bool,
    /// Some register here needs a key: show the sign-in form.
    pub sign_in: bool,
    /// The key just presented belongs to no member.
    pub refused: bool,
    /// A refusal or an absent register, in words.
    pub notice: Option<Notice>,
}

/// Notices the page can carry instead of registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    NothingVisible,
    NotFound,
}

/// The page's context for the template.
#[derive(Serialize)]
struct Page {
    lang: &'static str,
    t: &'static Text,
    /// The other languages, as links (`?lang=`, relative to the page).
    languages: Vec<LangLink>,
    registers: Vec<RegisterCtx>,
    signed_in: bool,
    sign_in: bool,
    refused: bool,
    message: Option<&'static str>,
}

#[derive(Serialize)]
struct LangLink {
    tag: &'static str,
    name: &'static str,
}

#[derive(Serialize)]
struct RegisterCtx {
    id: String,
    title: String,
    period: String,
    rolling: bool,
    started: Option<TimeCtx>,
    resets: Option<TimeCtx>,
    rules: Vec<String>,
    members: Vec<MemberCtx>,
    budgets: Vec<BudgetCtx>,
}

#[derive(Serialize)]
struct TimeCtx {
    /// RFC 3339, for `<time datetime>`.
    iso: String,
    text: String,
}

#[derive(Serialize)]
struct MemberCtx {
    name: String,
    state: &'static str,
    state_text: &'static str,
    tokens: BarCtx,
    energy: BarCtx,
    requests: String,
    reclaimed: Option<String>,
    history: Vec<PastCtx>,
}

/// One bar: the words, and the geometry when there is a stint.
#[derive(Serialize)]
struct BarCtx {
    text: String,
    /// Percent of the stint, as written in `text` (to a tenth).
    percent: Option<String>,
    /// Width of the fill, in percent of the track.
    width: String,
    /// Track scale: percent of the stint at the track's end.
    scale: String,
    ticks: Vec<String>,
}

#[derive(Serialize)]
struct PastCtx {
    /// Height in percent of the tallest column.
    height: String,
    label: String,
}

#[derive(Serialize)]
struct BudgetCtx {
    name: String,
    state_text: String,
    figures: Vec<(String, String)>,
    chart: Option<ChartCtx>,
}

#[derive(Serialize)]
struct ChartCtx {
    id: String,
    desc: String,
    supply_points: String,
    draw_points: String,
    y_max: String,
}

/// The SVG's drawing area (viewBox units).
const CHART_W: f64 = 600.0;
const CHART_H: f64 = 160.0;

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        // A template that does not parse fails every render with its error.
        if let Err(e) = env.add_template("register.html", include_str!("templates/register.html")) {
            tracing::error!(error = %e, "the register template does not parse");
        }
        env
    })
}

/// The whole page.
pub fn page(
    registers: &[Register],
    mode: &Mode,
    lang: Lang,
    now: Timestamp,
) -> Result<String, RenderError> {
    let t = lang.text();
    let message = mode.notice.map(|n| match n {
        Notice::NothingVisible => t.nothing_visible,
        Notice::NotFound => t.not_found,
    });
    let ctx = Page {
        lang: lang.tag(),
        t,
        languages: Lang::ALL
            .into_iter()
            .filter(|l| *l != lang)
            .map(|l| LangLink {
                tag: l.tag(),
                name: l.text().language_name,
            })
            .collect(),
        registers: registers
            .iter()
            .map(|r| register_ctx(r, lang, now))
            .collect(),
        signed_in: mode.signed_in,
        sign_in: mode.sign_in,
        refused: mode.refused,
        message,
    };
    let tpl = environment().get_template("register.html")?;
    Ok(tpl.render(minijinja::value::Serde(&ctx))?)
}

fn time_ctx(t: Timestamp, tz: &str) -> TimeCtx {
    TimeCtx {
        iso: t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        text: format!("{} ({tz})", t.to_zoned(zone(tz)).strftime("%Y-%m-%d %H:%M")),
    }
}

fn date_of(t: Timestamp, tz: &str) -> String {
    t.to_zoned(zone(tz)).strftime("%Y-%m-%d").to_string()
}

/// The page's zone; UTC when the spec names none the database knows.
fn zone(tz: &str) -> TimeZone {
    time_zone(tz).unwrap_or(TimeZone::UTC)
}

fn register_ctx(r: &Register, lang: Lang, now: Timestamp) -> RegisterCtx {
    let t = lang.text();
    let s = &r.sanctions;
    let scale = s.suspend_at.max(100.0);
    let pct = |x: f64| lang.dec(x, 0);
    let mut throttle = fill(
        t.throttle_rule,
        &[
            ("pct", &pct(s.throttle_at)),
            ("rpm", &lang.int(i64::from(s.throttled_requests_per_minute))),
        ],
    );
    if s.throttled_only_when_idle {
        throttle.push_str(t.throttle_idle);
    }
    throttle.push('.');
    RegisterCtx {
        id: format!("{}-{}", r.namespace, r.name),
        title: format!("{}/{}", r.namespace, r.name),
        period: r.period.clone(),
        rolling: r.rolling,
        started: r.period_start.map(|x| time_ctx(x, &r.time_zone)),
        resets: r.resets_at.map(|x| time_ctx(x, &r.time_zone)),
        rules: vec![
            fill(t.warn_rule, &[("pct", &pct(s.warn_at))]),
            throttle,
            fill(t.suspend_rule, &[("pct", &pct(s.suspend_at))]),
        ],
        members: r
            .members
            .iter()
            .map(|m| member_ctx(m, r, lang, scale))
            .collect(),
        budgets: r.energy.iter().map(|b| budget_ctx(b, lang, now)).collect(),
    }
}

fn state_words(s: MemberState, t: &Text) -> (&'static str, &'static str) {
    match s {
        MemberState::Ok => ("ok", t.ok),
        MemberState::Warned => ("warned", t.warned),
        MemberState::Throttled => ("throttled", t.throttled),
        MemberState::Suspended => ("suspended", t.suspended),
    }
}

/// A bar for `used` against `stint` (formatted by `fmt`).
fn bar(
    used: String,
    stint: Option<String>,
    percent: Option<f64>,
    r: &Register,
    lang: Lang,
    scale: f64,
) -> BarCtx {
    let t = lang.text();
    let at = |p: f64| format!("{:.2}", (p / scale * 100.0).clamp(0.0, 100.0));
    match (stint, percent) {
        (Some(stint), Some(p)) => BarCtx {
            text: fill(
                t.of_stint,
                &[("used", &used), ("stint", &stint), ("pct", &lang.dec(p, 1))],
            ),
            percent: Some(p.to_string()),
            width: at(p),
            scale: scale.to_string(),
            ticks: [r.sanctions.warn_at, 100.0, r.sanctions.throttle_at]
                .into_iter()
                .filter(|x| *x < scale)
                .map(at)
                .collect(),
        },
        _ => BarCtx {
            text: fill(t.no_stint, &[("used", &used)]),
            percent: None,
            width: "0.00".into(),
            scale: scale.to_string(),
            ticks: Vec::new(),
        },
    }
}

fn member_ctx(m: &MemberLine, r: &Register, lang: Lang, scale: f64) -> MemberCtx {
    let t = lang.text();
    let (state, state_text) = state_words(m.state, t);
    let tallest = m
        .history
        .iter()
        .map(|h| h.tokens)
        .chain(m.stint_tokens)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    MemberCtx {
        name: m.name.clone(),
        state,
        state_text,
        tokens: bar(
            lang.int(m.tokens),
            m.stint_tokens.map(|s| lang.int(s)),
            m.tokens_percent,
            r,
            lang,
            scale,
        ),
        energy: bar(
            format!("{} Wh", lang.dec(m.energy_wh, 2)),
            m.stint_energy_wh.map(|s| format!("{} Wh", lang.dec(s, 2))),
            m.energy_percent,
            r,
            lang,
            scale,
        ),
        requests: lang.int(m.requests),
        reclaimed: (m.reclaimed_tokens > 0)
            .then(|| fill(t.reclaimed, &[("n", &lang.int(m.reclaimed_tokens))])),
        history: m
            .history
            .iter()
            .map(|h| PastCtx {
                height: format!(
                    "{:.2}",
                    (h.tokens as f64 / tallest * 100.0).clamp(0.0, 100.0)
                ),
                label: fill(
                    t.past_period,
                    &[
                        ("start", &date_of(h.start, &r.time_zone)),
                        ("end", &date_of(h.end, &r.time_zone)),
                        ("tokens", &lang.int(h.tokens)),
                    ],
                ),
            })
            .collect(),
    }
}

fn budget_state(state: Option<&str>, t: &Text) -> String {
    match state {
        Some("WithinBudget") | None => t.within_budget.into(),
        Some("PowerCapped") => t.power_capped.into(),
        Some("Shedding") => t.shedding.into(),
        Some("Deferring") => t.deferring.into(),
        Some(other) => other.into(),
    }
}

fn budget_ctx(b: &BudgetLine, lang: Lang, now: Timestamp) -> BudgetCtx {
    let t = lang.text();
    let w = |x: Option<f64>| x.map_or_else(|| "–".into(), |x| format!("{} W", lang.dec(x, 0)));
    BudgetCtx {
        name: b.name.clone(),
        state_text: budget_state(b.state.as_deref(), t),
        figures: vec![
            (t.supply.into(), w(b.supply_watts)),
            (t.allowance.into(), w(b.allowance_watts)),
            (t.draw.into(), w(b.draw_watts)),
        ],
        chart: chart(b, lang, now),
    }
}

/// Polyline points for the last 24 hours: x from 24 h ago (0) to now
/// (`CHART_W`), y from 0 W (`CHART_H`) up to the largest value.
fn chart(b: &BudgetLine, lang: Lang, now: Timestamp) -> Option<ChartCtx> {
    if b.history.is_empty() {
        return None;
    }
    let t = lang.text();
    let window = crate::energy::history::WINDOW.as_millis() as f64;
    let from = now - crate::energy::history::WINDOW;
    let peak_draw = b.history.iter().map(|p| p.draw_watts).fold(0.0, f64::max);
    let y_max = b
        .history
        .iter()
        .map(|p| p.supply_watts)
        .fold(peak_draw, f64::max)
        .max(1.0);
    let points = |value: fn(&PowerPoint) -> f64| {
        b.history
            .iter()
            .map(|p| {
                let x = p.at.duration_since(from).as_millis() as f64 / window * CHART_W;
                let y = CHART_H - value(p).max(0.0) / y_max * CHART_H;
                format!("{:.1},{:.1}", x.clamp(0.0, CHART_W), y)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let last = b.history.last()?;
    Some(ChartCtx {
        id: format!("chart-{}", b.name),
        desc: fill(
            t.chart_desc,
            &[
                ("supply", &lang.dec(last.supply_watts, 0)),
                ("draw", &lang.dec(last.draw_watts, 0)),
                ("peak", &lang.dec(peak_draw, 0)),
            ],
        ),
        supply_points: points(|p| p.supply_watts),
        draw_points: points(|p| p.draw_watts),
        y_max: format!("{} W", lang.dec(y_max, 0)),
    })
}

#[cfg(test)]
mod tests {
    use super::super::view::{budgets_covering, register, tests as data};
    use super::*;

    fn html(lang: Lang) -> String {
        let now = data::t("2026-12-02T12:00:00Z");
        let budgets = [std::sync::Arc::new(data::budget("solar", &["town/m"]))];
        let chosen = budgets_covering(&budgets, &["town/m".to_string()]);
        let r = register(&data::quota(), &chosen, now);
        page(&[r], &Mode::default(), lang, now).expect("renders")
    }

    #[test]
    fn each_member_is_a_table_row_with_bars_to_scale() {
        let h = html(Lang::En);
        assert!(h.contains("<th scope=\"row\">ana</th>"), "{h}");
        assert!(h.contains("<th scope=\"row\">cy</th>"));
        // ana: 4,250 of 10,000 tokens is 42.5 %; the track ends at 120 %.
        assert!(h.contains("4,250 of 10,000 (42.5 %)"));
        assert!(h.contains("data-percent=\"42.5\" data-scale=\"120\""));
        assert!(h.contains("style=\"width: 35.42%\""), "42.5 / 120");
        // bo is past the stint: 110 / 120 of the track, and throttled.
        assert!(h.contains("style=\"width: 91.67%\""));
        assert!(h.contains("class=\"state throttled\">throttled<"));
        // cy has no stint: words, no bar.
        assert!(h.contains("0, no stint"));
        assert!(h.contains("Warned from 80 % of the stint"));
        assert!(h.contains("<caption>"));
        assert!(!h.contains("<script"), "no JavaScript");
    }

    #[test]
    fn the_energy_chart_spans_the_last_24_hours() {
        let h = html(Lang::En);
        // 06:00 is 18 h after 12:00 yesterday: x = 450; 300 W of 900 W.
        assert!(h.contains("450.0,106.7"), "{h}");
        // 11:45 is 23.75 h in: x = 593.75; 700 W of 900 W.
        assert!(h.contains("593.8,35.6"));
        assert!(h.contains("Now 900 W supply and 700 W draw"));
        assert!(h.contains("GPUs power-capped"));
        assert!(h.contains("role=\"img\""));
    }

    #[test]
    fn german_pages_use_german_words_and_numbers() {
        let h = html(Lang::De);
        assert!(h.contains("<html lang=\"de\">"));
        assert!(h.contains("4.250 von 10.000 (42,5 %)"));
        assert!(h.contains("Verwarnt ab 80 %"));
        assert!(h.contains("gedrosselt"));
        assert!(h.contains("href=\"?lang=en\" hreflang=\"en\""));
    }

    #[test]
    fn names_are_escaped() {
        let now = data::t("2026-12-02T12:00:00Z");
        let mut r = register(&data::quota(), &[], now);
        r.members[0].name = "<b>x</b>".into();
        let h = page(
            &[r],
            &Mode {
                signed_in: true,
                ..Mode::default()
            },
            Lang::En,
            now,
        )
        .expect("renders");
        // minijinja escapes `/` too.
        assert!(h.contains("&lt;b&gt;x&lt;&#x2f;b&gt;"), "{h}");
        assert!(!h.contains("<b>x</b>"));
        assert!(h.contains("action=\"/register/forget\""));
    }

    #[test]
    fn the_sign_in_form_posts_the_key() {
        let now = data::t("2026-12-02T12:00:00Z");
        let mode = Mode {
            sign_in: true,
            refused: true,
            ..Mode::default()
        };
        let h = page(&[], &mode, Lang::En, now).expect("renders");
        assert!(h.contains("method=\"post\" action=\"/register/key\""));
        assert!(h.contains("type=\"password\""));
        assert!(h.contains("<label for=\"key\">"));
        assert!(h.contains("No member holds that key."));
    }
}
