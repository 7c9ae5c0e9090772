//! The register page's words, in English (the default) and German, and the
//! way numbers are written in each. A language is chosen by `?lang=`, else
//! by the best `Accept-Language` match, else English. Adding a language is
//! one more [`Text`] and one more [`Lang`] arm: the compiler checks that no
//! string is missing.

use serde::Serialize;

/// A language the page is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Lang {
    En,
    De,
}

impl Lang {
    /// Every language, the default first.
    pub const ALL: [Lang; 2] = [Lang::En, Lang::De];

    /// The BCP 47 tag, for `<html lang>` and `?lang=`.
    pub fn tag(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::De => "de",
        }
    }

    pub fn text(self) -> &'static Text {
        match self {
            Lang::En => &EN,
            Lang::De => &DE,
        }
    }

    fn from_tag(tag: &str) -> Option<Lang> {
        let primary = tag.split(['-', '_']).next()?.trim();
        Lang::ALL
            .into_iter()
            .find(|l| l.tag().eq_ignore_ascii_case(primary))
    }

    /// `?lang=` wins; else the `Accept-Language` entry with the highest
    /// weight that names a language we have; else English.
    pub fn choose(query: Option<&str>, accept_language: Option<&str>) -> Lang {
        if let Some(l) = query.and_then(Lang::from_tag) {
            return l;
        }
        let mut best: Option<(f32, Lang)> = None;
        for part in accept_language.unwrap_or_default().split(',') {
            let mut it = part.split(';');
            let Some(l) = it.next().and_then(Lang::from_tag) else {
                continue;
            };
            let q = it
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            // Earlier entries win ties, as the header's order says.
            if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, l));
            }
        }
        best.map(|(_, l)| l).unwrap_or(Lang::En)
    }

    /// An integer with thousands grouped: `12,345` or `12.345`.
    pub fn int(self, n: i64) -> String {
        let digits = n.unsigned_abs().to_string();
        let sep = match self {
            Lang::En => ',',
            Lang::De => '.',
        };
        let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
        if n < 0 {
            out.push('-');
        }
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(sep);
            }
            out.push(c);
        }
        out
    }

    /// A decimal with `places` places: `1,234.5` or `1.234,5`.
    pub fn dec(self, x: f64, places: usize) -> String {
        if !x.is_finite() {
            return "–".into();
        }
        let s = format!("{:.*}", places, x.abs());
        let (whole, frac) = s.split_once('.').unwrap_or((&s, ""));
        let whole: i64 = whole.parse().unwrap_or(0);
        let negative = x < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0');
        let mut out = if negative {
            "-".to_string()
        } else {
            String::new()
        };
        out.push_str(&self.int(whole));
        if !frac.is_empty() {
            out.push(match self {
                Lang::En => '.',
                Lang::De => ',',
            });
            out.push_str(frac);
        }
        out
    }
}

/// Fill `{name}` placeholders.
pub fn fill(template: &str, args: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in args {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// Every string on the page.
#[derive(Debug, Serialize)]
pub struct Text {
    pub language_name: &'static str,
    pub title: &'static str,
    pub lead: &'static str,
    pub period: &'static str,
    pub started: &'static str,
    pub resets: &'static str,
    pub members_caption: &'static str,
    pub member: &'static str,
    pub state: &'static str,
    pub tokens: &'static str,
    pub energy: &'static str,
    pub requests: &'static str,
    pub trend: &'static str,
    pub ok: &'static str,
    pub warned: &'static str,
    pub throttled: &'static str,
    pub suspended: &'static str,
    /// `{used}`, `{stint}`, `{pct}`.
    pub of_stint: &'static str,
    /// `{used}`.
    pub no_stint: &'static str,
    pub sanctions: &'static str,
    /// `{pct}`.
    pub warn_rule: &'static str,
    /// `{pct}`, `{rpm}`.
    pub throttle_rule: &'static str,
    pub throttle_idle: &'static str,
    /// `{pct}`.
    pub suspend_rule: &'static str,
    /// `{n}`.
    pub reclaimed: &'static str,
    pub energy_heading: &'static str,
    pub no_budget: &'static str,
    pub supply: &'static str,
    pub draw: &'static str,
    pub allowance: &'static str,
    pub within_budget: &'static str,
    pub power_capped: &'static str,
    pub shedding: &'static str,
    pub deferring: &'static str,
    pub chart_title: &'static str,
    /// `{supply}`, `{draw}`, `{peak}` (watts, formatted).
    pub chart_desc: &'static str,
    pub hours_ago: &'static str,
    pub now: &'static str,
    pub no_readings: &'static str,
    /// `{start}`, `{end}`, `{tokens}`.
    pub past_period: &'static str,
    pub no_past_periods: &'static str,
    pub sign_in_heading: &'static str,
    pub sign_in_lead: &'static str,
    pub key_label: &'static str,
    pub sign_in: &'static str,
    pub sign_out: &'static str,
    pub bad_key: &'static str,
    pub nothing_visible: &'static str,
    pub not_found: &'static str,
    pub rolling_note: &'static str,
}

pub static EN: Text = Text {
    language_name: "English",
    title: "Register of the commons",
    lead: "Who used what of the shared models this period, against each member's stint.",
    period: "Period",
    started: "Started",
    resets: "Resets",
    members_caption: "Members' use this period",
    member: "Member",
    state: "State",
    tokens: "Tokens",
    energy: "Energy",
    requests: "Requests",
    trend: "Last periods",
    ok: "ok",
    warned: "warned",
    throttled: "throttled",
    suspended: "suspended",
    of_stint: "{used} of {stint} ({pct} %)",
    no_stint: "{used}, no stint",
    sanctions: "Sanctions",
    warn_rule: "Warned from {pct} % of the stint: answers say how many tokens are left.",
    throttle_rule: "Throttled from {pct} %: at most {rpm} requests a minute",
    throttle_idle: ", and only while the model is idle",
    suspend_rule: "Suspended from {pct} %: refused until the period resets.",
    reclaimed: "{n} of these tokens were charged from a gateway replica that stopped.",
    energy_heading: "Energy budget",
    no_budget: "No energy budget covers this register's models.",
    supply: "Supply",
    draw: "Draw",
    allowance: "Allowance",
    within_budget: "within budget",
    power_capped: "GPUs power-capped",
    shedding: "shedding replicas",
    deferring: "deferring deferrable requests",
    chart_title: "Supply and draw over the last 24 hours",
    chart_desc: "Now {supply} W supply and {draw} W draw; the highest draw was {peak} W.",
    hours_ago: "24 h ago",
    now: "now",
    no_readings: "No readings in the last 24 hours yet.",
    past_period: "{start} to {end}: {tokens} tokens",
    no_past_periods: "none yet",
    sign_in_heading: "Members' register",
    sign_in_lead: "This register is open to its members. Enter your API key to see your commons' register.",
    key_label: "Your API key",
    sign_in: "Show my register",
    sign_out: "Forget my key on this device",
    bad_key: "No member holds that key.",
    nothing_visible: "No register is open to you from here.",
    not_found: "There is no register of that name open to you.",
    rolling_note: "Rolling period: the counted use includes the sliding share of the previous window.",
};

pub static DE: Text = Text {
    language_name: "Deutsch",
    title: "Register des Gemeinguts",
    lead: "Wer in dieser Periode was von den gemeinsamen Modellen genutzt hat, gemessen am Anteil jedes Mitglieds.",
    period: "Periode",
    started: "Begonnen",
    resets: "Neubeginn",
    members_caption: "Nutzung der Mitglieder in dieser Periode",
    member: "Mitglied",
    state: "Stand",
    tokens: "Tokens",
    energy: "Energie",
    requests: "Anfragen",
    trend: "Letzte Perioden",
    ok: "in Ordnung",
    warned: "verwarnt",
    throttled: "gedrosselt",
    suspended: "gesperrt",
    of_stint: "{used} von {stint} ({pct} %)",
    no_stint: "{used}, ohne Anteil",
    sanctions: "Sanktionen",
    warn_rule: "Verwarnt ab {pct} % des Anteils: Antworten nennen die verbleibenden Tokens.",
    throttle_rule: "Gedrosselt ab {pct} %: höchstens {rpm} Anfragen pro Minute",
    throttle_idle: ", und nur, solange das Modell frei ist",
    suspend_rule: "Gesperrt ab {pct} %: abgewiesen bis zum Neubeginn der Periode.",
    reclaimed: "{n} dieser Tokens stammen von einem ausgefallenen Gateway-Replikat.",
    energy_heading: "Energiebudget",
    no_budget: "Kein Energiebudget umfasst die Modelle dieses Registers.",
    supply: "Angebot",
    draw: "Verbrauch",
    allowance: "Erlaubt",
    within_budget: "im Budget",
    power_capped: "GPU-Leistung begrenzt",
    shedding: "Replikate abgeschaltet",
    deferring: "aufschiebbare Anfragen zurückgestellt",
    chart_title: "Angebot und Verbrauch der letzten 24 Stunden",
    chart_desc: "Jetzt {supply} W Angebot und {draw} W Verbrauch; der höchste Verbrauch war {peak} W.",
    hours_ago: "vor 24 h",
    now: "jetzt",
    no_readings: "Noch keine Messwerte in den letzten 24 Stunden.",
    past_period: "{start} bis {end}: {tokens} Tokens",
    no_past_periods: "noch keine",
    sign_in_heading: "Register der Mitglieder",
    sign_in_lead: "Dieses Register steht seinen Mitgliedern offen. Geben Sie Ihren API-Schlüssel ein, um das Register Ihres Gemeinguts zu sehen.",
    key_label: "Ihr API-Schlüssel",
    sign_in: "Mein Register zeigen",
    sign_out: "Schlüssel auf diesem Gerät vergessen",
    bad_key: "Kein Mitglied hat diesen Schlüssel.",
    nothing_visible: "Von hier aus ist Ihnen kein Register zugänglich.",
    not_found: "Ein Register dieses Namens ist Ihnen nicht zugänglich.",
    rolling_note: "Gleitende Periode: die gezählte Nutzung enthält den gleitenden Anteil des vorigen Fensters.",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_wins_then_the_heaviest_accepted_language_then_english() {
        assert_eq!(Lang::choose(Some("de"), Some("en")), Lang::De);
        assert_eq!(Lang::choose(Some("xx"), Some("de-CH, en;q=0.5")), Lang::De);
        assert_eq!(Lang::choose(None, Some("fr, en;q=0.4, de;q=0.9")), Lang::De);
        assert_eq!(Lang::choose(None, Some("fr, de;q=0")), Lang::En);
        assert_eq!(Lang::choose(None, Some("en-GB, de")), Lang::En);
        assert_eq!(Lang::choose(None, Some("*")), Lang::En);
        assert_eq!(Lang::choose(None, None), Lang::En);
    }

    #[test]
    fn numbers_are_grouped_as_each_language_writes_them() {
        assert_eq!(Lang::En.int(1_234_567), "1,234,567");
        assert_eq!(Lang::De.int(1_234_567), "1.234.567");
        assert_eq!(Lang::En.int(-999), "-999");
        assert_eq!(Lang::En.int(0), "0");
        assert_eq!(Lang::En.dec(12345.678, 1), "12,345.7");
        assert_eq!(Lang::De.dec(12345.678, 1), "12.345,7");
        assert_eq!(Lang::De.dec(-0.04, 1), "0,0");
        assert_eq!(Lang::En.dec(-2.5, 2), "-2.50");
        assert_eq!(Lang::En.dec(f64::NAN, 1), "–");
    }

    #[test]
    fn placeholders_are_filled() {
        assert_eq!(
            fill(
                EN.of_stint,
                &[("used", "5"), ("stint", "10"), ("pct", "50.0")]
            ),
            "5 of 10 (50.0 %)"
        );
    }
}
