//! Markup that cannot carry unescaped data: [`Markup`] takes literal
//! markup only as `&'static str` (written in this crate's source), and
//! every other value through [`Markup::text`], which escapes it. The
//! [`html!`](crate::html) macro writes a sequence of both:
//!
//! ```ignore
//! html!(out, "<td class=\"id\">", {order.id}, "</td>");
//! ```
//!
//! String literals are markup; `{expr}` is escaped text (anything
//! `Display`); `[expr]` is a [`Markup`] fragment built the same way.

use std::fmt::{self, Display, Write as _};

/// HTML (or SVG) built from literal markup and escaped text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Markup(String);

impl Markup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Literal markup from the source code.
    pub fn raw(&mut self, markup: &'static str) -> &mut Self {
        self.0.push_str(markup);
        self
    }

    /// `value` as escaped text (also safe inside a quoted attribute).
    pub fn text(&mut self, value: impl Display) -> &mut Self {
        let mut escaper = Escaper(&mut self.0);
        let _ = write!(escaper, "{value}");
        self
    }

    /// A fragment built by another [`Markup`].
    pub fn markup(&mut self, fragment: &Markup) -> &mut Self {
        self.0.push_str(&fragment.0);
        self
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Escapes `& < > " '` as it writes.
struct Escaper<'a>(&'a mut String);

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#x27;"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// `value` escaped, as a string.
pub fn escape(value: impl Display) -> String {
    let mut m = Markup::new();
    m.text(value);
    m.into_string()
}

/// Writes literal markup, `{escaped text}` and `[fragments]` to a [`Markup`].
#[macro_export]
macro_rules! html {
    ($out:expr $(, $part:tt)* $(,)?) => {{
        let out: &mut $crate::console::html::Markup = &mut $out;
        $( $crate::html!(@part out, $part); )*
    }};
    (@part $out:ident, $lit:literal) => {
        $out.raw($lit);
    };
    (@part $out:ident, { $e:expr }) => {
        $out.text(&$e);
    };
    (@part $out:ident, [ $e:expr ]) => {
        $out.markup(&$e);
    };
}

/// Percent-encodes `value` for a URL path segment or query value: every
/// byte but the unreserved ones (RFC 3986).
pub fn url_part(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_literals_are_not() {
        let mut m = Markup::new();
        let hostile = "<script>alert('x')</script> & \"quoted\"";
        crate::html!(m, "<td title=\"", { hostile }, "\">", { hostile }, "</td>");
        assert_eq!(
            m.as_str(),
            "<td title=\"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;\">\
             &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;</td>"
        );
        let mut outer = Markup::new();
        crate::html!(outer, "<tr>", [m], "</tr>");
        assert!(outer.as_str().starts_with("<tr><td title="));
    }

    #[test]
    fn url_parts_keep_only_unreserved_bytes() {
        assert_eq!(url_part("order-42_a.b~"), "order-42_a.b~");
        assert_eq!(url_part("a/b?c=d&e f"), "a%2Fb%3Fc%3Dd%26e%20f");
        assert_eq!(url_part("é"), "%C3%A9");
    }
}
