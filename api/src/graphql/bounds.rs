//! Bounds on a query's text, checked before async-graphql parses it. Its parser and
//! validator recurse once per level of nesting of argument values (`[[[…]]]`,
//! `{a: {a: …}}`), so a few kilobytes nested a few thousand deep overflow a thread's stack
//! and abort the whole process. This scan is one loop over the bytes, with no recursion:
//! it counts characters, tokens and the deepest nesting of `{`, `[` and `(` (selections,
//! list and object values, arguments alike), skipping strings and comments.
//!
//! Once parsed (safely, within those bounds), the document's aliases and directives are
//! counted as written, each definition once: a spread fragment's cost shows in the
//! complexity, and a fragment that spreads itself is never followed here.

use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextPrepareRequest,
};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Request, ServerError, ServerResult, Variables};

/// The bounds, from the configuration (`query_max_chars`, `query_max_tokens`,
/// `query_max_nesting`).
#[derive(Debug, Clone, Copy)]
pub struct TextBounds {
    pub max_chars: usize,
    pub max_tokens: usize,
    pub max_nesting: usize,
    /// Of the parsed document (`query_max_aliases`, `query_max_directives`).
    pub max_aliases: usize,
    pub max_directives: usize,
}

/// Which bound a query broke, and the configuration key that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfBounds {
    pub key: &'static str,
    pub message: String,
}

impl TextBounds {
    /// Scans `query` once; stops at the first bound crossed.
    pub fn check(&self, query: &str) -> Result<(), OutOfBounds> {
        let chars = query.chars().count();
        if chars > self.max_chars {
            return Err(OutOfBounds {
                key: "query_max_chars",
                message: format!(
                    "the query is {chars} characters long; at most {} are allowed",
                    self.max_chars
                ),
            });
        }
        let bytes = query.as_bytes();
        let (mut i, mut tokens, mut depth) = (0usize, 0usize, 0usize);
        while i < bytes.len() {
            let b = bytes[i];
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | b',' => {
                    i += 1;
                    continue;
                }
                b'#' => {
                    while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                        i += 1;
                    }
                    continue;
                }
                b'"' if bytes[i..].starts_with(b"\"\"\"") => i = skip_block_string(bytes, i + 3),
                b'"' => i = skip_string(bytes, i + 1),
                b'{' | b'[' | b'(' => {
                    depth += 1;
                    if depth > self.max_nesting {
                        return Err(OutOfBounds {
                            key: "query_max_nesting",
                            message: format!(
                                "the query nests selections, arguments or values more than {} levels deep",
                                self.max_nesting
                            ),
                        });
                    }
                    i += 1;
                }
                b'}' | b']' | b')' => {
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                b'.' if bytes[i..].starts_with(b"...") => i += 3,
                _ if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {
                    // A name or a number (with its sign, fraction and exponent).
                    i += 1;
                    while i < bytes.len()
                        && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'.'))
                    {
                        i += 1;
                    }
                }
                _ => {
                    // Any other punctuator, or a byte the parser will refuse: one token.
                    i += 1;
                }
            }
            tokens += 1;
            if tokens > self.max_tokens {
                return Err(OutOfBounds {
                    key: "query_max_tokens",
                    message: format!("the query has more than {} tokens", self.max_tokens),
                });
            }
        }
        Ok(())
    }
}

/// Past the closing quote of a `"…"` string that starts at `i` (just after its quote), or
/// at its line's end when it is not closed there (the parser refuses it later).
fn skip_string(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            b'\n' | b'\r' => return i,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// Past the closing `"""` of a block string that starts at `i`; `\"""` does not close it.
fn skip_block_string(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        if bytes[i..].starts_with(b"\\\"\"\"") {
            i += 4;
        } else if bytes[i..].starts_with(b"\"\"\"") {
            return i + 3;
        } else {
            i += 1;
        }
    }
    bytes.len()
}

/// Refuses a request whose text is out of bounds before it reaches the parser, on every
/// transport (HTTP, each item of a batch, WebSocket operations).
pub struct Bounds(pub TextBounds);

impl ExtensionFactory for Bounds {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(BoundsExtension(self.0))
    }
}

struct BoundsExtension(TextBounds);

#[async_graphql::async_trait::async_trait]
impl Extension for BoundsExtension {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        if let Err(out) = self.0.check(&request.query) {
            return Err(out.into());
        }
        next.run(ctx, request).await
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        self.0
            .check_document(&document)
            .map_err(ServerError::from)?;
        Ok(document)
    }
}

impl From<OutOfBounds> for ServerError {
    fn from(out: OutOfBounds) -> Self {
        let mut error = ServerError::new(out.message, None);
        let extensions = error.extensions.get_or_insert_with(Default::default);
        extensions.set("code", "BAD_USER_INPUT");
        extensions.set("limit", out.key);
        error
    }
}

impl TextBounds {
    /// Aliases and directives as written, every selection set visited once (a stack, no
    /// recursion; fragment spreads are not followed).
    pub fn check_document(&self, document: &ExecutableDocument) -> Result<(), OutOfBounds> {
        let mut sets: Vec<&SelectionSet> = Vec::new();
        let mut directives = 0usize;
        for (_, operation) in document.operations.iter() {
            directives += operation.node.directives.len();
            sets.push(&operation.node.selection_set.node);
        }
        for fragment in document.fragments.values() {
            directives += fragment.node.directives.len();
            sets.push(&fragment.node.selection_set.node);
        }
        let mut aliases = 0usize;
        while let Some(set) = sets.pop() {
            for selection in &set.items {
                match &selection.node {
                    Selection::Field(field) => {
                        aliases += usize::from(field.node.alias.is_some());
                        directives += field.node.directives.len();
                        sets.push(&field.node.selection_set.node);
                    }
                    Selection::FragmentSpread(spread) => {
                        directives += spread.node.directives.len();
                    }
                    Selection::InlineFragment(inline) => {
                        directives += inline.node.directives.len();
                        sets.push(&inline.node.selection_set.node);
                    }
                }
            }
        }
        if aliases > self.max_aliases {
            return Err(OutOfBounds {
                key: "query_max_aliases",
                message: format!(
                    "the query has {aliases} aliases; at most {} are allowed",
                    self.max_aliases
                ),
            });
        }
        if directives > self.max_directives {
            return Err(OutOfBounds {
                key: "query_max_directives",
                message: format!(
                    "the query has {directives} directives; at most {} are allowed",
                    self.max_directives
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: TextBounds = TextBounds {
        max_chars: 10_000,
        max_tokens: 1_000,
        max_nesting: 8,
        max_aliases: 3,
        max_directives: 2,
    };

    fn document_key(query: &str) -> Option<&'static str> {
        let document = async_graphql::parser::parse_query(query).unwrap();
        BOUNDS.check_document(&document).err().map(|e| e.key)
    }

    #[test]
    fn aliases_and_directives_are_counted_as_written() {
        assert_eq!(document_key("{ a: x b: y c: z }"), None);
        assert_eq!(
            document_key("{ a: x b: y c: z d: w }"),
            Some("query_max_aliases")
        );
        assert_eq!(
            document_key("{ a: x { b: y { c: z { d: w } } } }"),
            Some("query_max_aliases")
        );
        assert_eq!(
            document_key("{ ...F ...F ...F ...F } fragment F on Query { a: x }"),
            None,
            "a fragment's aliases count once"
        );
        assert_eq!(document_key("{ x @skip(if: true) @skip(if: true) }"), None);
        assert_eq!(
            document_key("{ x @skip(if: true) @skip(if: true) @skip(if: true) }"),
            Some("query_max_directives")
        );
        assert_eq!(
            document_key("{ ...F } fragment F on Query { ...F }"),
            None,
            "a fragment spreading itself is not followed"
        );
    }

    fn key(query: &str) -> Option<&'static str> {
        BOUNDS.check(query).err().map(|e| e.key)
    }

    #[test]
    fn nesting_counts_selections_lists_objects_and_arguments_alike() {
        assert_eq!(key("{ a(x: [[1]]) { b { c } } }"), None);
        let lists = format!("{{ a(x: {}1{}) }}", "[".repeat(7), "]".repeat(7));
        assert_eq!(key(&lists), Some("query_max_nesting"));
        let objects = format!("{{ a(x: {}) }}", "{a: ".repeat(7));
        assert_eq!(key(&objects), Some("query_max_nesting"));
        let selections = format!("{}{}", "{ a ".repeat(9), "}".repeat(9));
        assert_eq!(key(&selections), Some("query_max_nesting"));
    }

    #[test]
    fn brackets_in_strings_and_comments_do_not_count() {
        let inside = "[".repeat(50);
        assert_eq!(key(&format!("{{ a(x: \"{inside}\") }}")), None);
        assert_eq!(key(&format!("{{ a(x: \"\\\"{inside}\") }}")), None);
        assert_eq!(
            key(&format!("{{ a(x: \"\"\"{inside}\\\"\"\"{inside}\"\"\") }}")),
            None
        );
        assert_eq!(key(&format!("# {inside}\n{{ a }}")), None);
        // An unclosed string ends at its line; what follows counts again.
        assert_eq!(
            key(&format!("{{ a(x: \"open\n{inside}")),
            Some("query_max_nesting")
        );
    }

    #[test]
    fn tokens_and_characters_are_bounded() {
        let names = "a ".repeat(1_001);
        assert_eq!(key(&format!("{{ {names} }}")), Some("query_max_tokens"));
        // Commas and comments are not tokens.
        let commas = ",".repeat(5_000);
        assert_eq!(key(&format!("{{ a {commas} }}")), None);
        assert_eq!(key(&"#".repeat(10_001)), Some("query_max_chars"));
        // Numbers, spreads and punctuators are a token each.
        assert_eq!(
            key("query($v: Int = -1.5e3) { ...F a @skip(if: $v) }"),
            None
        );
    }
}
