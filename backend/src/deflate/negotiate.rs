//! permessage-deflate's handshake (RFC 7692 §5, §7.1): reading the
//! `Sec-WebSocket-Extensions` offers a client sends, answering one of them
//! as a server, and checking a server's answer to offers passed on.
//!
//! The header's grammar is RFC 6455 §9.1 (a comma-separated list of
//! extensions, each with `;`-separated parameters whose values are tokens or
//! quoted strings); the parameters and what a server may answer to each are
//! RFC 7692 §7.1. A malformed header is a bad request; a well-formed
//! permessage-deflate offer whose parameters are invalid is declined, as
//! §5 requires of a server, and the next offer is tried.

use http::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_EXTENSIONS};

use super::codec::{MAX_WINDOW_BITS, MIN_WINDOW_BITS};

/// What a server prefers, within which it answers an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preferences {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: u8,
    pub client_max_window_bits: u8,
}

impl Default for Preferences {
    /// Context takeover both ways, full windows.
    fn default() -> Self {
        Preferences {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: MAX_WINDOW_BITS,
            client_max_window_bits: MAX_WINDOW_BITS,
        }
    }
}

/// The extension's name.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// One element of an extension list: a name and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

/// The `Sec-WebSocket-Extensions` header does not follow RFC 6455 §9.1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Sec-WebSocket-Extensions: {0}")]
pub struct Malformed(&'static str);

/// Whether parameters are read as a client's offer or a server's answer:
/// only an offer may give `client_max_window_bits` without a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Offer,
    Answer,
}

/// The parameters of one permessage-deflate offer or answer, as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: an offer's bare `client_max_window_bits`, by which the
    /// client says it can honour a limit the server sets.
    pub client_max_window_bits: Option<Option<u8>>,
}

/// What both ends agreed: how each compresses (`server_*`: what the server
/// sends, `client_*`: what the client sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: u8,
    pub client_max_window_bits: u8,
}

/// A server's answer that no client could accept for its offers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAnswer {
    #[error("{0}")]
    Malformed(#[from] Malformed),
    #[error("answered with more than one extension")]
    SeveralExtensions,
    #[error("answered with extension `{0}`, which was not offered")]
    NotOffered(String),
    #[error("invalid permessage-deflate parameters: {0}")]
    Invalid(&'static str),
    #[error("the permessage-deflate answer fits none of the client's offers")]
    FitsNoOffer,
}

/// Parses every `Sec-WebSocket-Extensions` line of `headers` into one list
/// (several lines are one comma-separated list, RFC 9110 §5.3).
pub fn elements(headers: &HeaderMap) -> Result<Vec<Element>, Malformed> {
    let mut out = Vec::new();
    for value in headers.get_all(SEC_WEBSOCKET_EXTENSIONS) {
        let text = value.to_str().map_err(|_| Malformed("not visible ASCII"))?;
        Lexer::new(text).list(&mut out)?;
    }
    Ok(out)
}

/// The client's valid permessage-deflate offers, in its order of
/// preference; an invalid one is left out (declined).
pub fn offers(headers: &HeaderMap) -> Result<Vec<Params>, Malformed> {
    Ok(elements(headers)?
        .iter()
        .filter(|e| e.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE))
        .filter_map(|e| Params::read(e, Role::Offer).ok())
        .collect())
}

/// The header that passes `offers` on (to an upstream that is to answer
/// the client's offers itself), or `None` for no offer.
pub fn offers_header(offers: &[Params]) -> Option<HeaderValue> {
    if offers.is_empty() {
        return None;
    }
    let text = offers
        .iter()
        .map(Params::render)
        .collect::<Vec<_>>()
        .join(", ");
    Some(HeaderValue::from_str(&text).expect("rendered from tokens"))
}

/// The answer in `headers` as one line, for a client to read as the
/// server sent it (its lines joined, as RFC 9110 §5.3 allows).
pub fn answer_header(headers: &HeaderMap) -> HeaderValue {
    let mut lines = headers.get_all(SEC_WEBSOCKET_EXTENSIONS).iter();
    let first = lines
        .next()
        .cloned()
        .unwrap_or(HeaderValue::from_static(""));
    lines.fold(first, |joined, line| {
        let mut bytes = joined.as_bytes().to_vec();
        bytes.extend_from_slice(b", ");
        bytes.extend_from_slice(line.as_bytes());
        HeaderValue::from_bytes(&bytes).expect("joined header lines")
    })
}

/// Checks a server's `Sec-WebSocket-Extensions` answer to `offers` as the
/// client must (RFC 7692 §7.1): `Ok(None)` when it accepted none, the
/// agreement when it accepted one of them.
pub fn check_answer(headers: &HeaderMap, offers: &[Params]) -> Result<Option<Agreed>, BadAnswer> {
    let answered = elements(headers)?;
    let element = match answered.as_slice() {
        [] => return Ok(None),
        [one] => one,
        _ => return Err(BadAnswer::SeveralExtensions),
    };
    if !element.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) || offers.is_empty() {
        return Err(BadAnswer::NotOffered(element.name.clone()));
    }
    let answer = Params::read(element, Role::Answer).map_err(BadAnswer::Invalid)?;
    offers
        .iter()
        .find_map(|offer| answer.agreed_to(offer))
        .map(Some)
        .ok_or(BadAnswer::FitsNoOffer)
}

/// As the server: the first of `offers` that can be accepted within
/// `ours`, with the answer to send. `min_server_window` is the smallest
/// window the compressor can keep to ([`super::codec::MIN_DEFLATE_WINDOW_BITS`]).
pub fn accept(
    offers: &[Params],
    ours: &Preferences,
    min_server_window: u8,
) -> Option<(Agreed, HeaderValue)> {
    offers.iter().find_map(|offer| {
        // RFC 7692 §7.1.2.1: the server may lower its window below what
        // the client allows, never raise it above.
        let server_bits = offer
            .server_max_window_bits
            .map_or(ours.server_max_window_bits, |n| {
                n.min(ours.server_max_window_bits)
            });
        if server_bits < min_server_window {
            return None;
        }
        // §7.1.2.2: a limit on the client's window only if it offered to
        // honour one; a value it offered is its own limit already.
        let client_bits = match offer.client_max_window_bits {
            None => None,
            Some(offered) => {
                let limit = offered.unwrap_or(MAX_WINDOW_BITS);
                Some(limit.min(ours.client_max_window_bits))
            }
        };
        let answer = Params {
            server_no_context_takeover: offer.server_no_context_takeover
                || ours.server_no_context_takeover,
            client_no_context_takeover: offer.client_no_context_takeover
                || ours.client_no_context_takeover,
            server_max_window_bits: (server_bits < MAX_WINDOW_BITS
                || offer.server_max_window_bits.is_some())
            .then_some(server_bits),
            client_max_window_bits: client_bits.filter(|&b| b < MAX_WINDOW_BITS).map(Some),
        };
        let agreed = answer.agreed_to(offer).expect("an answer within the offer");
        let header = HeaderValue::from_str(&answer.render()).expect("rendered from tokens");
        Some((agreed, header))
    })
}

impl Params {
    fn read(element: &Element, role: Role) -> Result<Params, &'static str> {
        let mut p = Params::default();
        let mut seen = [false; 4];
        for (name, value) in &element.params {
            let slot = match name.to_ascii_lowercase().as_str() {
                "server_no_context_takeover" => 0,
                "client_no_context_takeover" => 1,
                "server_max_window_bits" => 2,
                "client_max_window_bits" => 3,
                _ => return Err("unknown parameter"),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err("a parameter given twice");
            }
            let value = value.as_deref();
            match (slot, value) {
                (0, None) => p.server_no_context_takeover = true,
                (1, None) => p.client_no_context_takeover = true,
                (0 | 1, Some(_)) => return Err("a no_context_takeover parameter with a value"),
                (2, Some(v)) => p.server_max_window_bits = Some(window_bits(v)?),
                (2, None) => return Err("server_max_window_bits without a value"),
                (3, Some(v)) => p.client_max_window_bits = Some(Some(window_bits(v)?)),
                (3, None) if role == Role::Offer => p.client_max_window_bits = Some(None),
                (3, None) => return Err("client_max_window_bits without a value in an answer"),
                _ => unreachable!("four slots"),
            }
        }
        Ok(p)
    }

    /// What an answer `self` agrees to for `offer`, if a client that sent
    /// `offer` must accept it (RFC 7692 §7.1).
    fn agreed_to(&self, offer: &Params) -> Option<Agreed> {
        // §7.1.1.1: asked not to take over, the server must say it will not.
        if offer.server_no_context_takeover && !self.server_no_context_takeover {
            return None;
        }
        // §7.1.2.1: the server's window within the one the client allows.
        let server = match (offer.server_max_window_bits, self.server_max_window_bits) {
            (Some(_), None) => return None,
            (Some(limit), Some(n)) if n > limit => return None,
            (_, n) => n.unwrap_or(MAX_WINDOW_BITS),
        };
        // §7.1.2.2: a limit on the client's window only where it offered
        // to honour one, and within the one it named.
        let client = match (offer.client_max_window_bits, self.client_max_window_bits) {
            (None, Some(_)) => return None,
            (Some(Some(limit)), Some(Some(n))) if n > limit => return None,
            (_, Some(Some(n))) => n,
            (Some(Some(limit)), None) => limit,
            _ => MAX_WINDOW_BITS,
        };
        Some(Agreed {
            server_no_context_takeover: self.server_no_context_takeover,
            client_no_context_takeover: self.client_no_context_takeover
                || offer.client_no_context_takeover,
            server_max_window_bits: server,
            client_max_window_bits: client,
        })
    }

    fn render(&self) -> String {
        let mut out = String::from(PERMESSAGE_DEFLATE);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if let Some(n) = self.server_max_window_bits {
            out.push_str(&format!("; server_max_window_bits={n}"));
        }
        match self.client_max_window_bits {
            Some(Some(n)) => out.push_str(&format!("; client_max_window_bits={n}")),
            Some(None) => out.push_str("; client_max_window_bits"),
            None => {}
        }
        out
    }
}

/// A window-bits value: a decimal 8 to 15 with no leading zero (RFC 7692
/// §7.1.2.1), possibly sent as a quoted string.
fn window_bits(value: &str) -> Result<u8, &'static str> {
    let bits = match value.as_bytes() {
        [d @ b'8'..=b'9'] => d - b'0',
        [b'1', d @ b'0'..=b'5'] => 10 + d - b'0',
        _ => return Err("a window size other than 8 to 15"),
    };
    debug_assert!((MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits));
    Ok(bits)
}

/// Reads RFC 6455 §9.1's extension list.
struct Lexer<'a> {
    rest: &'a str,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Lexer { rest: text }
    }

    fn skip_space(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t']);
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn token(&mut self) -> Result<&'a str, Malformed> {
        self.skip_space();
        let end = self
            .rest
            .find(|c: char| !is_tchar(c))
            .unwrap_or(self.rest.len());
        if end == 0 {
            return Err(Malformed("a token was expected"));
        }
        let (token, rest) = self.rest.split_at(end);
        self.rest = rest;
        Ok(token)
    }

    /// A parameter value: a token, or a quoted string whose content
    /// (unescaped) must itself be a token (RFC 6455 §9.1).
    fn value(&mut self) -> Result<String, Malformed> {
        self.skip_space();
        let Some(quoted) = self.rest.strip_prefix('"') else {
            return self.token().map(str::to_owned);
        };
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        loop {
            match chars.next() {
                None => return Err(Malformed("an unterminated quoted string")),
                Some((i, '"')) => {
                    self.rest = &quoted[i + 1..];
                    break;
                }
                Some((_, '\\')) => match chars.next() {
                    Some((_, c)) => value.push(c),
                    None => return Err(Malformed("an unterminated quoted string")),
                },
                Some((_, c)) => value.push(c),
            }
        }
        if value.is_empty() || !value.chars().all(is_tchar) {
            return Err(Malformed("a quoted value that is not a token"));
        }
        Ok(value)
    }

    fn list(&mut self, out: &mut Vec<Element>) -> Result<(), Malformed> {
        loop {
            // Empty list elements are allowed and skipped (RFC 9110 §5.6.1).
            while self.eat(',') {}
            self.skip_space();
            if self.rest.is_empty() {
                return Ok(());
            }
            let name = self.token()?.to_owned();
            let mut params = Vec::new();
            while self.eat(';') {
                let param = self.token()?.to_owned();
                let value = if self.eat('=') {
                    Some(self.value()?)
                } else {
                    None
                };
                params.push((param, value));
            }
            out.push(Element { name, params });
            self.skip_space();
            if self.rest.is_empty() {
                return Ok(());
            }
            if !self.eat(',') {
                return Err(Malformed("`,` or `;` was expected"));
            }
        }
    }
}

/// RFC 9110 §5.6.2's token characters.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(line).unwrap(),
            );
        }
        h
    }

    fn offer(line: &str) -> Vec<Params> {
        offers(&headers(&[line])).unwrap()
    }

    fn answer_to(offer_line: &str, answer_line: &str) -> Result<Option<Agreed>, BadAnswer> {
        check_answer(&headers(&[answer_line]), &offer(offer_line))
    }

    const FULL: Agreed = Agreed {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 15,
        client_max_window_bits: 15,
    };

    #[test]
    fn reads_what_browsers_offer() {
        // Chromium's and Firefox's offer.
        let o = offer("permessage-deflate; client_max_window_bits");
        assert_eq!(
            o,
            vec![Params {
                client_max_window_bits: Some(None),
                ..Params::default()
            }]
        );
    }

    #[test]
    fn reads_lists_over_several_lines_with_quotes_and_space() {
        let h = headers(&[
            "x-webkit-deflate-frame, permessage-deflate ;server_max_window_bits=\"10\"",
            " , Permessage-Deflate; client_no_context_takeover ;client_max_window_bits = 12 ,",
        ]);
        let e = elements(&h).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].name, "x-webkit-deflate-frame");
        assert_eq!(
            offers(&h).unwrap(),
            vec![
                Params {
                    server_max_window_bits: Some(10),
                    ..Params::default()
                },
                Params {
                    client_no_context_takeover: true,
                    client_max_window_bits: Some(Some(12)),
                    ..Params::default()
                },
            ]
        );
    }

    #[test]
    fn a_malformed_header_is_refused() {
        for bad in [
            "permessage-deflate;",
            "permessage-deflate; a=",
            "permessage-deflate; a=\"unterminated",
            "permessage-deflate; a=\"not a token\"",
            "permessage-deflate x",
            "; a",
            "permessage-deflate; a=b=c",
        ] {
            assert!(offers(&headers(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_invalid_offer_is_declined_and_the_next_one_tried() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=1",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; mystery",
        ] {
            assert_eq!(
                offer(&format!("{bad}, permessage-deflate")),
                vec![Params::default()],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn offers_pass_on_rendered_alone() {
        let o = offer("foo; bar, permessage-deflate; client_max_window_bits; server_max_window_bits=\"12\", permessage-deflate");
        assert_eq!(
            offers_header(&o).unwrap(),
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits, permessage-deflate"
        );
        assert_eq!(offers_header(&[]), None);
    }

    #[test]
    fn an_answer_within_the_offer_is_agreed() {
        let browser = "permessage-deflate; client_max_window_bits";
        assert_eq!(answer_to(browser, "permessage-deflate"), Ok(Some(FULL)));
        assert_eq!(
            answer_to(
                browser,
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=9"
            ),
            Ok(Some(Agreed {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 10,
                client_max_window_bits: 9,
            }))
        );
        // A limit the client named holds without an answer repeating it.
        assert_eq!(
            answer_to(
                "permessage-deflate; client_max_window_bits=11",
                "permessage-deflate"
            ),
            Ok(Some(Agreed {
                client_max_window_bits: 11,
                ..FULL
            }))
        );
        // No extension answered: none agreed.
        assert_eq!(check_answer(&HeaderMap::new(), &offer(browser)), Ok(None));
        // The second offer is the one answered.
        assert_eq!(
            answer_to(
                "permessage-deflate; server_max_window_bits=9, permessage-deflate",
                "permessage-deflate; server_max_window_bits=12"
            ),
            Ok(Some(Agreed {
                server_max_window_bits: 12,
                ..FULL
            }))
        );
    }

    #[test]
    fn an_answer_outside_every_offer_is_refused() {
        let cases = [
            (
                "permessage-deflate",
                "permessage-deflate; client_max_window_bits=10",
                BadAnswer::FitsNoOffer,
            ),
            (
                "permessage-deflate; client_max_window_bits=10",
                "permessage-deflate; client_max_window_bits=12",
                BadAnswer::FitsNoOffer,
            ),
            (
                "permessage-deflate; server_max_window_bits=10",
                "permessage-deflate",
                BadAnswer::FitsNoOffer,
            ),
            (
                "permessage-deflate; server_max_window_bits=10",
                "permessage-deflate; server_max_window_bits=11",
                BadAnswer::FitsNoOffer,
            ),
            (
                "permessage-deflate; server_no_context_takeover",
                "permessage-deflate",
                BadAnswer::FitsNoOffer,
            ),
            (
                "permessage-deflate",
                "permessage-deflate, permessage-deflate",
                BadAnswer::SeveralExtensions,
            ),
            (
                "permessage-deflate",
                "x-webkit-deflate-frame",
                BadAnswer::NotOffered("x-webkit-deflate-frame".into()),
            ),
            (
                "x-other",
                "permessage-deflate",
                BadAnswer::NotOffered("permessage-deflate".into()),
            ),
            (
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; client_max_window_bits",
                BadAnswer::Invalid("client_max_window_bits without a value in an answer"),
            ),
            (
                "permessage-deflate",
                "permessage-deflate; unknown",
                BadAnswer::Invalid("unknown parameter"),
            ),
        ];
        for (o, a, why) in cases {
            assert_eq!(answer_to(o, a), Err(why), "{o:?} answered {a:?}");
        }
        assert!(matches!(
            answer_to("permessage-deflate", "permessage-deflate;"),
            Err(BadAnswer::Malformed(_))
        ));
    }

    #[test]
    fn the_broker_answers_within_the_offer_and_its_config() {
        let ours = Preferences::default();
        let accept_line = |line: &str, ours: &Preferences, min: u8| {
            accept(&offer(line), ours, min).map(|(a, h)| (a, h.to_str().unwrap().to_owned()))
        };
        let (agreed, answer) =
            accept_line("permessage-deflate; client_max_window_bits", &ours, 9).unwrap();
        assert_eq!(agreed, FULL);
        assert_eq!(answer, "permessage-deflate");

        let tight = Preferences {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 11,
            client_max_window_bits: 10,
        };
        let (agreed, answer) =
            accept_line("permessage-deflate; client_max_window_bits", &tight, 9).unwrap();
        assert_eq!(
            answer,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=11; client_max_window_bits=10"
        );
        assert_eq!(
            agreed,
            Agreed {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 11,
                client_max_window_bits: 10,
            }
        );
        // A client that cannot limit its window is not asked to.
        let (agreed, answer) = accept_line("permessage-deflate", &tight, 9).unwrap();
        assert_eq!(agreed.client_max_window_bits, 15);
        assert!(!answer.contains("client_max_window_bits"), "{answer}");
        // A window the compressor cannot keep to declines that offer only.
        assert_eq!(
            accept_line("permessage-deflate; server_max_window_bits=8", &ours, 9),
            None
        );
        let (agreed, _) = accept_line(
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9",
            &ours,
            9,
        )
        .unwrap();
        assert_eq!(agreed.server_max_window_bits, 9);
        // Every answer the broker gives is one its own check accepts.
        for line in [
            "permessage-deflate; client_max_window_bits=9; server_max_window_bits=12",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits",
        ] {
            for config in [&ours, &tight] {
                let (agreed, answer) = accept_line(line, config, 9).unwrap();
                assert_eq!(answer_to(line, &answer), Ok(Some(agreed)), "{line:?}");
            }
        }
    }
}
