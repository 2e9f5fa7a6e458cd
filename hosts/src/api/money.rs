//! Money on the wire: a decimal string with at most two places, never a float.

use std::borrow::Cow;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use rust_decimal::Decimal;
use serde_json::Value;

/// What the database column holds: `NUMERIC(12, 2)`.
pub const PATTERN: &str = r"^[0-9]{1,10}(\.[0-9]{1,2})?$";

/// A non-negative amount with at most 10 integer digits and 2 decimals,
/// written as a JSON string such as `"19.99"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money(pub Decimal);

impl Money {
    /// The largest amount a column can hold.
    pub fn max() -> Decimal {
        Decimal::new(999_999_999_999, 2)
    }

    fn parse(text: &str) -> Option<Decimal> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        let ok = (1..=10).contains(&int.len())
            && digits(int)
            && (!text.contains('.') || (1..=2).contains(&frac.len()))
            && digits(frac);
        if !ok {
            return None;
        }
        text.parse().ok()
    }
}

impl Type for Money {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "money".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let mut schema = MetaSchema::new_with_format("string", "decimal");
        schema.pattern = Some(PATTERN.to_owned());
        schema.example = Some(Value::String("19.99".into()));
        schema.description =
            Some("A decimal amount as a string, at most 10 digits before the point and 2 after.");
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

impl ParseFromJSON for Money {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(text)) => Money::parse(&text).map(Money).ok_or_else(|| {
                ParseError::custom(format!(
                    "`{text}` is not an amount like \"19.99\" (at most 10 digits before the \
                     point and 2 after)"
                ))
            }),
            Some(other) => Err(ParseError::custom(format!(
                "expected an amount as a string like \"19.99\", got {other}"
            ))),
            None => Err(ParseError::custom("an amount is required")),
        }
    }
}

impl ToJSON for Money {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(format!("{:.2}", self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_two_place_decimals_parse() {
        for ok in ["0", "19.99", "19.9", "9999999999.99"] {
            assert!(Money::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "",
            ".5",
            "1.",
            "1.234",
            "-1",
            "1e3",
            "12345678901",
            " 1",
            "NaN",
        ] {
            assert!(Money::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(
            Money(Decimal::new(5, 0)).to_json(),
            Some(Value::String("5.00".into()))
        );
    }
}
