//! Device state as plain data.
//!
//! Every device the core emulates can write its state out as a plain struct
//! that serializes (`state()`) and be rebuilt from one (`restore` or
//! `from_state`) with the same guest-visible behaviour; snapshots build on
//! this. A state read back is untrusted input, like anything a guest writes:
//! every field is checked (lengths, vector counts, queue sizes, register
//! indexes, bits a device never sets) before any of it is applied, and a bad
//! state is a [`StateError`], never a panic or a half-restored device.

use thiserror::Error;

/// Why a saved state cannot be restored.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// A table or buffer has the wrong number of entries for this device.
    #[error("{what}: {got} entries where the device has {want}")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    /// A number beyond what the device allows.
    #[error("{what}: {value:#x} is out of range (at most {max:#x})")]
    Range {
        what: &'static str,
        value: u64,
        max: u64,
    },
    /// A value or combination of values the device never holds.
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    /// The state belongs to another device (identity, layout or name differ).
    #[error("{what}: the state is for another device ({detail})")]
    Mismatch { what: &'static str, detail: String },
    /// The state is not well-formed JSON of the expected shape.
    #[error("{what}: {detail}")]
    Json { what: &'static str, detail: String },
}

impl StateError {
    /// A [`StateError::Invalid`] about `what`.
    pub fn invalid(what: &'static str, detail: impl Into<String>) -> StateError {
        StateError::Invalid {
            what,
            detail: detail.into(),
        }
    }

    /// A [`StateError::Mismatch`] about `what`.
    pub fn mismatch(what: &'static str, detail: impl Into<String>) -> StateError {
        StateError::Mismatch {
            what,
            detail: detail.into(),
        }
    }
}

/// Checks that `got` entries are the `want` the device has.
pub fn check_len(what: &'static str, got: usize, want: usize) -> Result<(), StateError> {
    if got == want {
        Ok(())
    } else {
        Err(StateError::Length { what, got, want })
    }
}

/// Checks that `value` is at most `max`.
pub fn check_max(what: &'static str, value: u64, max: u64) -> Result<(), StateError> {
    if value <= max {
        Ok(())
    } else {
        Err(StateError::Range { what, value, max })
    }
}

/// Checks that `value` sets only bits of `allowed`.
pub fn check_bits(what: &'static str, value: u64, allowed: u64) -> Result<(), StateError> {
    if value & !allowed == 0 {
        Ok(())
    } else {
        Err(StateError::invalid(
            what,
            format!("{value:#x} sets bits outside {allowed:#x}"),
        ))
    }
}

/// Serializes a state into a JSON value (plain data: it cannot fail for the
/// structs of this crate, whose fields are numbers, strings and vectors).
pub fn to_json<T: serde::Serialize>(state: &T) -> serde_json::Value {
    serde_json::to_value(state).unwrap_or(serde_json::Value::Null)
}

/// Parses a state of type `T` from a JSON value.
pub fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    value: &serde_json::Value,
) -> Result<T, StateError> {
    T::deserialize(value).map_err(|e| StateError::Json {
        what,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field() {
        assert_eq!(check_len("entries", 3, 3), Ok(()));
        assert_eq!(
            check_len("entries", 2, 3),
            Err(StateError::Length {
                what: "entries",
                got: 2,
                want: 3
            })
        );
        assert!(check_max("index", 0x80, 0x7f).is_err());
        assert!(check_bits("status", 0x81, 0x0f).is_err());
        assert_eq!(check_bits("status", 0x05, 0x0f), Ok(()));
        let e = from_json::<u8>("byte", &serde_json::json!("x")).unwrap_err();
        assert!(matches!(e, StateError::Json { what: "byte", .. }));
        assert_eq!(from_json::<u8>("byte", &to_json(&7u8)), Ok(7));
    }
}
