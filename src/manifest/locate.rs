//! Finds where a field stands in the manifest text, for errors found after deserialization (a
//! duplicate id, a TTL too short for the probe). serde_yaml is the only YAML parser we carry, so the
//! position comes from it: the document is walked along the field path and a deliberate error is
//! raised at the target node, which serde_yaml reports with that node's line and column.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a field path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(&'static str),
    Index(usize),
}

/// The line and column (both 1-based) of the node at `path`, or of the deepest ancestor present.
pub fn position(text: &str, path: &[Segment]) -> Option<(usize, usize)> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    match Locator(path).deserialize(deserializer) {
        Ok(()) => None,
        Err(e) => e.location().map(|l| (l.line(), l.column())),
    }
}

const FOUND: &str = "consul-registrar: located";

struct Locator<'p>(&'p [Segment]);

impl<'de> DeserializeSeed<'de> for Locator<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locator<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Segment::Key(want), rest)) = self.0.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        while let Some(key) = map.next_key::<String>()? {
            if key == *want {
                return map.next_value_seed(Locator(rest));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom(FOUND))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Segment::Index(want), rest)) = self.0.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(FOUND));
            }
        }
        match seq.next_element_seed(Locator(rest))? {
            Some(()) => Ok(()),
            None => Err(de::Error::custom(FOUND)),
        }
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
}

#[cfg(test)]
mod tests {
    use super::Segment::{Index, Key};
    use super::*;

    const DOC: &str =
        "services:\n  - name: a\n    port: 1\n  - name: b\n    id: x\n    check:\n      ttl: 1s\n";

    #[test]
    fn finds_nested_fields() {
        assert_eq!(
            position(DOC, &[Key("services"), Index(1), Key("id")]),
            Some((5, 9))
        );
        assert_eq!(
            position(DOC, &[Key("services"), Index(1), Key("check"), Key("ttl")]),
            Some((7, 12))
        );
        assert_eq!(
            position(DOC, &[Key("services"), Index(0), Key("name")]),
            Some((2, 11))
        );
    }
}
