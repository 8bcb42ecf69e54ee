//! A handle's attributes, packed.
//!
//! There is one handle per pod, and tabby-node gives each four attributes
//! (container id, interface, namespace, pod name). As a
//! `BTreeMap<String, String>` those are a map node and eight strings, about
//! 900 bytes of heap per pod; packed, one buffer of about 100 bytes for a
//! typical pod. Decoding a record packs straight from its bytes, with no map
//! and no string per entry on the way. On the wire and on disk the
//! attributes are the map they hold: the store's format is unchanged.
use serde::{
    de::{DeserializeSeed, MapAccess, Visitor},
    ser::SerializeMap,
    Deserialize, Deserializer, Serialize, Serializer,
};
use std::{borrow::Cow, cell::RefCell, collections::BTreeMap, fmt};

/// String attributes (key → value), packed into one buffer: for each key,
/// then its value, a header and maybe bytes. The header is a LEB128 varint:
/// odd, `2i + 1`, names [`COMMON`]`[i]` and no bytes follow; `4n` is
/// followed by the `n` bytes of the string; `4n + 2` by `n` bytes that are
/// the string's `2n` lowercase hex digits, two to a byte (a container id,
/// 64 digits, takes 32 bytes). Keys are unique and in order, as in a
/// `BTreeMap`. Which form a string takes depends on the string alone, so
/// the encoding of a map is unique and equal buffers are equal maps. Empty:
/// no allocation.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Attributes(Box<[u8]>);

/// Strings that nearly every pod's attributes repeat (tabby-node's keys, and
/// the usual interface and namespaces): one byte each in memory instead of
/// their length and bytes. Only memory holds this form (the store and the
/// wire hold the map), so the list may change from one release to the next.
const COMMON: [&str; 8] = [
    "container_id",
    "ifname",
    "namespace",
    "pod",
    "reclaimed_from",
    "eth0",
    "default",
    "kube-system",
];

impl Attributes {
    /// The (key, value) pairs, in key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(&self.0)
    }

    /// How many pairs there are (counted without unpacking any string).
    pub fn len(&self) -> usize {
        let mut b = &self.0[..];
        let mut strings = 0;
        while let Some((_, rest)) = split(b) {
            b = rest;
            strings += 1;
        }
        strings / 2
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<Cow<'_, str>> {
        self.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Bytes of heap the packed form takes (memory accounting, tests).
    pub fn packed_len(&self) -> usize {
        self.0.len()
    }
}

/// Shortest string packed as hex digits: shorter ones save little and
/// would cost every reader of them a copy.
const HEX_MIN: usize = 16;

/// Whether `s` is packed two digits to a byte: an even number, at least
/// [`HEX_MIN`], of lowercase hex digits (so it unpacks to exactly `s`).
fn is_hex(s: &str) -> bool {
    s.len() >= HEX_MIN
        && s.len().is_multiple_of(2)
        && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Appends `s` to a packed buffer.
fn push(buf: &mut Vec<u8>, s: &str) {
    let hex = is_hex(s);
    let header = match COMMON.iter().position(|c| *c == s) {
        Some(i) => 2 * i + 1,
        None if hex => 2 * s.len() + 2,
        None => 4 * s.len(),
    };
    // postcard writes an unsigned integer as exactly this varint.
    let mut room = [0u8; 10];
    let varint = postcard::to_slice(&(header as u64), &mut room)
        .expect("a u64 varint takes 10 bytes at most");
    buf.extend_from_slice(varint);
    match header % 4 {
        0 => buf.extend_from_slice(s.as_bytes()),
        2 => {
            let at = buf.len();
            buf.resize(at + s.len() / 2, 0);
            hex::decode_to_slice(s, &mut buf[at..]).expect("is_hex: even-length hex digits");
        }
        _ => {}
    }
}

/// One packed string, as its header says it is held.
enum Packed<'a> {
    /// [`COMMON`]`[i]`.
    Common(&'static str),
    /// The string's bytes.
    Text(&'a [u8]),
    /// Its lowercase hex digits, two to a byte.
    Hex(&'a [u8]),
}

/// The first string packed in `b`, and the rest.
fn split(b: &[u8]) -> Option<(Packed<'_>, &[u8])> {
    let (header, rest) = postcard::take_from_bytes::<u64>(b).ok()?;
    let header = usize::try_from(header).ok()?;
    if header % 2 == 1 {
        return Some((Packed::Common(COMMON.get(header / 2)?), rest));
    }
    let (s, rest) = rest.split_at_checked(header / 4)?;
    Some((
        if header % 4 == 2 {
            Packed::Hex(s)
        } else {
            Packed::Text(s)
        },
        rest,
    ))
}

/// The first string packed in `b`, unpacked, and the rest.
fn pop(b: &[u8]) -> Option<(Cow<'_, str>, &[u8])> {
    let (p, rest) = split(b)?;
    let s = match p {
        Packed::Common(s) => Cow::Borrowed(s),
        Packed::Hex(d) => Cow::Owned(hex::encode(d)),
        // Only ever packed from `str`s.
        Packed::Text(t) => Cow::Borrowed(std::str::from_utf8(t).ok()?),
    };
    Some((s, rest))
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
            .map(|(k, v)| 2 + k.as_ref().len() + v.as_ref().len())
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
    fn next_str(&mut self) -> Option<Cow<'a, str>> {
        let (s, rest) = pop(self.0)?;
        self.0 = rest;
        Some(s)
    }
}

impl<'a> Iterator for Iter<'a> {
    /// Hex-packed strings come back as a copy, the others borrowed.
    type Item = (Cow<'a, str>, Cow<'a, str>);
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
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(&*k, &*v)?;
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

/// Largest [`Pack`] buffer a thread keeps for the next map.
const SCRATCH_KEEP: usize = 64 << 10;

thread_local! {
    /// [`Pack`]'s buffer.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<'de> Visitor<'de> for Pack {
    type Value = Attributes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of strings to strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attributes, A::Error> {
        // Packed in a buffer kept per thread, then copied out once at its
        // size: no growing and shrinking per record while a store loads.
        let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        buf.clear();
        // Stored maps come in key order with unique keys (they were
        // BTreeMaps); anything else is put in order through a map.
        let mut ordered = true;
        let mut prev: Option<usize> = None;
        loop {
            let key = buf.len();
            if map.next_key_seed(Append(&mut buf))?.is_none() {
                break;
            }
            if let Some(p) = prev {
                let k = |at: usize| pop(&buf[at..]).map(|(s, _)| s);
                ordered &= k(p) < k(key);
            }
            map.next_value_seed(Append(&mut buf))?;
            prev = Some(key);
        }
        let a = Attributes(Box::from(&buf[..]));
        // A rare huge map does not pin its buffer's size to the thread.
        if buf.capacity() <= SCRATCH_KEEP {
            SCRATCH.with(|s| *s.borrow_mut() = buf);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_digit_late_in_a_string_leaves_it_as_text() {
        let s = format!("{}g", "a".repeat(19));
        let mut buf = vec![9];
        push(&mut buf, &s);
        let mut want = vec![9];
        want.extend(postcard::to_stdvec(&(4 * s.len() as u64)).unwrap());
        want.extend(s.as_bytes());
        assert_eq!(buf, want);
    }
}
