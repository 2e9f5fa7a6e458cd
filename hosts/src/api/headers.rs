//! Typed request headers whose schema carries a pattern that is checked by
//! hand: poem-openapi's `validator(pattern)` compiles its regular expression
//! on every request (a few percent of the api's time under load).

use std::borrow::Cow;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromParameter, ParseResult, Type};

/// The `Idempotency-Key` pattern, as the spec shows it.
pub const IDEMPOTENCY_KEY_PATTERN: &str = r"^[!-~]{1,255}[ \t]*$";

/// An `Idempotency-Key`: 1-255 visible ASCII characters, trailing blanks
/// ignored (they are trimmed here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(pub String);

impl IdempotencyKey {
    /// The key of a header value matching [`IDEMPOTENCY_KEY_PATTERN`].
    pub fn parse(value: &str) -> Option<Self> {
        let key = value.trim_end_matches([' ', '\t']);
        let visible = key.bytes().all(|b| matches!(b, b'!'..=b'~'));
        (visible && (1..=255).contains(&key.len())).then(|| Self(key.to_owned()))
    }
}

impl Type for IdempotencyKey {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let mut schema = MetaSchema::new("string");
        schema.pattern = Some(IDEMPOTENCY_KEY_PATTERN.to_owned());
        MetaSchemaRef::Inline(Box::new(schema))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromParameter for IdempotencyKey {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Self::parse(value).ok_or_else(|| {
            ParseError::custom("must be 1-255 visible ASCII characters (trailing blanks ignored)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_what_the_pattern_allows() {
        assert_eq!(
            IdempotencyKey::parse("order-7f3a"),
            Some(IdempotencyKey("order-7f3a".into()))
        );
        assert_eq!(
            IdempotencyKey::parse("k \t "),
            Some(IdempotencyKey("k".into()))
        );
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_some());
        for bad in ["", "   ", "a b", "caf\u{e9}", "\u{7f}x"] {
            assert_eq!(IdempotencyKey::parse(bad), None, "{bad:?}");
        }
        assert_eq!(IdempotencyKey::parse(&"k".repeat(256)), None);
    }
}
