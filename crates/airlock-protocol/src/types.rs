//! The Postgres types the data path carries, as both ends name them.
//!
//! Every input Arrow field carries its Postgres type in the field metadata under
//! [`TYPE_METADATA_KEY`] (`"int8"`, `"numeric"`, `"timestamptz[]"`, …), and the start
//! message lists the caller's output columns with theirs, so each runtime shim converts by
//! the declared type instead of guessing from values. docs/TYPES.md is the table of what
//! each type becomes in Python and in R, and which Arrow types the backend accepts back.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Field-metadata key of an input column's Postgres type.
pub const TYPE_METADATA_KEY: &str = "airlock.type";

/// A scalar Postgres type, after resolving domains. text, varchar, char and name are all
/// [`Scalar::Text`]: they look the same to a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scalar {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Text,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
    Time,
    Interval,
    Uuid,
    Json,
    Jsonb,
}

impl Scalar {
    pub const ALL: [Scalar; 17] = [
        Scalar::Bool,
        Scalar::Int2,
        Scalar::Int4,
        Scalar::Int8,
        Scalar::Float4,
        Scalar::Float8,
        Scalar::Numeric,
        Scalar::Text,
        Scalar::Bytea,
        Scalar::Date,
        Scalar::Timestamp,
        Scalar::Timestamptz,
        Scalar::Time,
        Scalar::Interval,
        Scalar::Uuid,
        Scalar::Json,
        Scalar::Jsonb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scalar::Bool => "bool",
            Scalar::Int2 => "int2",
            Scalar::Int4 => "int4",
            Scalar::Int8 => "int8",
            Scalar::Float4 => "float4",
            Scalar::Float8 => "float8",
            Scalar::Numeric => "numeric",
            Scalar::Text => "text",
            Scalar::Bytea => "bytea",
            Scalar::Date => "date",
            Scalar::Timestamp => "timestamp",
            Scalar::Timestamptz => "timestamptz",
            Scalar::Time => "time",
            Scalar::Interval => "interval",
            Scalar::Uuid => "uuid",
            Scalar::Json => "json",
            Scalar::Jsonb => "jsonb",
        }
    }
}

/// A column's type: a scalar or a one-dimensional array of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PgType {
    pub scalar: Scalar,
    pub array: bool,
}

impl PgType {
    pub fn scalar(scalar: Scalar) -> PgType {
        PgType {
            scalar,
            array: false,
        }
    }

    pub fn array_of(scalar: Scalar) -> PgType {
        PgType {
            scalar,
            array: true,
        }
    }
}

impl fmt::Display for PgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scalar.name())?;
        if self.array {
            f.write_str("[]")?;
        }
        Ok(())
    }
}

/// A type name this protocol does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown column type {0:?}")]
pub struct UnknownType(pub String);

impl FromStr for PgType {
    type Err = UnknownType;

    fn from_str(s: &str) -> Result<PgType, UnknownType> {
        let (base, array) = match s.strip_suffix("[]") {
            Some(base) => (base, true),
            None => (s, false),
        };
        Scalar::ALL
            .iter()
            .find(|t| t.name() == base)
            .map(|&scalar| PgType { scalar, array })
            .ok_or_else(|| UnknownType(s.to_owned()))
    }
}

impl TryFrom<String> for PgType {
    type Error = UnknownType;

    fn try_from(s: String) -> Result<PgType, UnknownType> {
        s.parse()
    }
}

impl From<PgType> for String {
    fn from(t: PgType) -> String {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_name_round_trips() {
        for scalar in Scalar::ALL {
            for t in [PgType::scalar(scalar), PgType::array_of(scalar)] {
                assert_eq!(t.to_string().parse::<PgType>(), Ok(t));
                let json = serde_json::to_string(&t).unwrap();
                assert_eq!(serde_json::from_str::<PgType>(&json).unwrap(), t);
            }
        }
        assert_eq!(
            "timestamptz[]".parse::<PgType>(),
            Ok(PgType::array_of(Scalar::Timestamptz))
        );
    }

    #[test]
    fn unknown_names_are_refused() {
        for bad in ["", "[]", "int4[][]", "point", "INT4", "int4 []"] {
            assert!(bad.parse::<PgType>().is_err(), "{bad:?} parsed");
        }
    }
}
