//! A handle's attributes, packed.
//!
//! There is one handle per pod, and tabby-node gives each four attributes
//! (container id, interface, namespace, pod name). As a
//! `BTreeMap<String, String>` those are a map node and eight strings, about
//! 900 bytes of heap per pod; packed, one buffer of the strings' length plus
//! 16 bytes. Decoding a record packs straight from its bytes, with no map
//! and no string per entry on the way. On the wire and on disk the
//! attributes are the map they hold: the store's format is unchanged.
use serde::{
    de::{DeserializeSeed, MapAccess, Visitor},
    ser::SerializeMap,
    Deserialize, Deserializer, Serialize, Serializer,
};
use std::{collections::BTreeMap, fmt};

/// String attributes (key → value), packed into one buffer: for each key,
/// then its value, the length (u32, little-endian) and the bytes. Keys are
/// unique and in order, as in a `BTreeMap`. Empty: no allocation.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Attributes(Box<[u8]>);

impl Attributes {
    /// The (key, value) pairs, in key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(&self.0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Appends `s` to a packed buffer.
fn push(buf: &mut Vec<u8>, s: &str) {
    // Attributes come in gRPC messages, far below 4 GiB: a length fits.
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

impl<K: AsRef<str> + Ord, V: AsRef<str>> FromIterator<(K, V)> for Attributes {
    /// The last value of a repeated key wins, as with `BTreeMap::insert`.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(it: I) -> Self {
        let mut m = BTreeMap::new();
        for (k, v) in it {
            m.insert(k, v);
        }
        Attributes::from(&m)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> From<&BTreeMap<K, V>> for Attributes {
    fn from(m: &BTreeMap<K, V>) -> Self {
        let len = m
            .iter()
            .map(|(k, v)| 8 + k.as_ref().len() + v.as_ref().len())
            .sum();
        let mut buf = Vec::with_capacity(len);
        for (k, v) in m {
            push(&mut buf, k.as_ref());
            push(&mut buf, v.as_ref());
        }
        Attributes(buf.into_boxed_slice())
    }
}

/// The pairs of an [`Attributes`].
#[derive(Clone)]
pub struct Iter<'a>(&'a [u8]);

impl<'a> Iter<'a> {
    fn next_str(&mut self) -> Option<&'a str> {
        let (n, rest) = self.0.split_first_chunk::<4>()?;
        let (s, rest) = rest.split_at_checked(u32::from_le_bytes(*n) as usize)?;
        self.0 = rest;
        // Only ever packed from `str`s.
        std::str::from_utf8(s).ok()
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);
    fn next(&mut self) -> Option<Self::Item> {
        Some((self.next_str()?, self.next_str()?))
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Attributes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.iter().count()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(Pack)
    }
}

/// Packs a map as it is decoded.
struct Pack;

impl<'de> Visitor<'de> for Pack {
    type Value = Attributes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of strings to strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attributes, A::Error> {
        let mut buf = Vec::new();
        // Stored maps come in key order with unique keys (they were
        // BTreeMaps); anything else is put in order through a map.
        let mut ordered = true;
        let mut prev: Option<std::ops::Range<usize>> = None;
        loop {
            let start = buf.len();
            if map.next_key_seed(Append(&mut buf))?.is_none() {
                break;
            }
            let key = start + 4..buf.len();
            map.next_value_seed(Append(&mut buf))?;
            if let Some(p) = prev {
                ordered &= buf[p] < buf[key.clone()];
            }
            prev = Some(key);
        }
        let a = Attributes(buf.into_boxed_slice());
        Ok(if ordered { a } else { a.iter().collect() })
    }
}

/// Appends one decoded string to a packed buffer.
struct Append<'b>(&'b mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Append<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Append<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        push(self.0, s);
        Ok(())
    }
}
