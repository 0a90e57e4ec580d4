//! Passwords out of connection strings before they are printed: every URL
//! that reaches a log line, an error or an endpoint goes through [`redact`].

/// What a password is replaced with.
pub const MASK: &str = "***";

/// `text` with every password in it masked: the `user:password@` part of
/// URLs (`amqp://`, `amqps://`, `postgres://`, …) and `password=` in query
/// strings and libpq keyword/value strings (`host=db password=secret`).
///
/// ```
/// use sluice_actors::redact::redact;
/// assert_eq!(redact("amqps://app:s3cret@mq:5671/%2f"), "amqps://app:***@mq:5671/%2f");
/// assert_eq!(redact("host=db password=s3cret user=app"), "host=db password=*** user=app");
/// ```
#[must_use]
pub fn redact(text: &str) -> String {
    mask_query_passwords(&mask_userinfo(text))
}

/// Masks the password of every `scheme://user:password@` in `text`.
fn mask_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first `/`, `?`, `#` or whitespace; the
        // user information is what precedes its last `@`.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _password)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Masks the value of every `password=` (query parameter or keyword).
fn mask_query_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(at) = lower.find("password=") else {
            break;
        };
        // Only a whole key: at the start, or after `?`, `&`, `;` or whitespace.
        let whole = at == 0
            || rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| matches!(c, '?' | '&' | ';') || c.is_whitespace());
        let value_at = at + "password=".len();
        out.push_str(&rest[..value_at]);
        rest = &rest[value_at..];
        if !whole {
            continue;
        }
        let end = if let Some(quoted) = rest.strip_prefix('\'') {
            // libpq quoting: 'a\'b' (a doubled '' is skipped too, to be safe).
            let mut chars = quoted.char_indices().peekable();
            let mut end = rest.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' if chars.peek().is_some_and(|&(_, next)| next == '\'') => {
                        chars.next();
                    }
                    '\'' => {
                        end = i + 2;
                        break;
                    }
                    _ => {}
                }
            }
            end
        } else {
            rest.find(|c: char| matches!(c, '&' | '#' | ';') || c.is_whitespace())
                .unwrap_or(rest.len())
        };
        out.push_str(MASK);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_only() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("postgres://app:p%40ss@db:5432/sluice?sslmode=verify-full"),
            "postgres://app:***@db:5432/sluice?sslmode=verify-full"
        );
        // A password holding `@` (unescaped) is still masked whole.
        assert_eq!(redact("amqp://u:a@b@host/v"), "amqp://u:***@host/v");
        assert_eq!(redact("amqps://host:5671/%2f"), "amqps://host:5671/%2f");
        assert_eq!(redact("postgres://app@db/x"), "postgres://app@db/x");
    }

    #[test]
    fn query_and_keyword_passwords_are_masked() {
        assert_eq!(
            redact("postgres://db/x?user=app&password=s3cret&sslmode=require"),
            "postgres://db/x?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            redact("host=db password='it''s secret' dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(
            redact(r"host=db password='it\'s secret' dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(redact("host=db PASSWORD=x"), "host=db PASSWORD=***");
        // Not a password key.
        assert_eq!(redact("mypassword=x"), "mypassword=x");
    }

    #[test]
    fn urls_inside_sentences_are_masked() {
        assert_eq!(
            redact("cannot reach amqp://a:b@h/v (refused); try amqp://c:d@k"),
            "cannot reach amqp://a:***@h/v (refused); try amqp://c:***@k"
        );
    }
}
