//! The machine number: exactly 8 ASCII digits, leading zeros significant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Number of digits in a machine number.
pub const LEN: usize = 8;

/// Exclusive upper bound of the numeric value of a machine number (10^8).
const LIMIT: u32 = 100_000_000;

/// A vending machine's number, e.g. `"00000001"`.
///
/// Stored as the 8 ASCII digit bytes themselves: the type is `Copy`, needs no
/// allocation, and ordering by bytes equals ordering by numeric value because
/// the width is fixed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineNo([u8; LEN]);

/// The error for a string that is not exactly 8 ASCII digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("machine_no must be exactly 8 ASCII digits")]
pub struct InvalidMachineNo;

impl MachineNo {
    /// Parses `s`, which must be exactly 8 ASCII digits (`'0'..='9'`).
    ///
    /// Unicode digits such as `'٣'` are rejected: the length check is on
    /// bytes, and every byte must be an ASCII digit.
    pub fn parse(s: &str) -> Result<Self, InvalidMachineNo> {
        let bytes: [u8; LEN] = s.as_bytes().try_into().map_err(|_| InvalidMachineNo)?;
        if bytes.iter().all(u8::is_ascii_digit) {
            Ok(Self(bytes))
        } else {
            Err(InvalidMachineNo)
        }
    }

    /// The 8 digits as a string slice.
    pub fn as_str(&self) -> &str {
        // Every constructor checks that all bytes are ASCII digits, and ASCII
        // is valid UTF-8, so this never fails; the fallback keeps it panic-free.
        std::str::from_utf8(&self.0).unwrap_or("00000000")
    }

    /// The machine number with numeric value `n`, zero-padded to 8 digits;
    /// `None` if `n` needs more than 8 digits. Used for bulk provisioning.
    pub fn from_u32(n: u32) -> Option<Self> {
        if n >= LIMIT {
            return None;
        }
        let mut digits = [b'0'; LEN];
        let mut rest = n;
        for d in digits.iter_mut().rev() {
            // `rest % 10` is below 10, so the cast cannot truncate.
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        Some(Self(digits))
    }

    /// The numeric value of the 8 digits (leading zeros are dropped).
    pub fn to_u32(&self) -> u32 {
        self.0
            .iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'))
    }
}

impl FromStr for MachineNo {
    type Err = InvalidMachineNo;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for MachineNo {
    type Error = InvalidMachineNo;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl fmt::Display for MachineNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for MachineNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MachineNo({})", self.as_str())
    }
}

impl AsRef<str> for MachineNo {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Serialize for MachineNo {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MachineNo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = MachineNo;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string of exactly 8 ASCII digits")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MachineNo, E> {
                MachineNo::parse(v).map_err(E::custom)
            }
        }

        // A visitor (rather than deserializing a `String`) avoids an
        // allocation and still accepts borrowed and owned strings.
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_numbers() {
        let m = MachineNo::parse("00000001").unwrap();
        assert_eq!(m.as_str(), "00000001");
        assert_eq!(m.to_u32(), 1);
        assert_eq!(m.to_string(), "00000001");
        assert_eq!(format!("{m:?}"), "MachineNo(00000001)");
        assert_eq!(
            "12345678".parse::<MachineNo>().unwrap().to_u32(),
            12_345_678
        );
        assert!(MachineNo::try_from("99999999").is_ok());
    }

    #[test]
    fn rejects_invalid_numbers() {
        for s in [
            "",
            "1234567",
            "123456789",
            "1234567a",
            " 1234567",
            "1234567 ",
            "+1234567",
            "-1234567",
            "１２３４５６７８",
            "٣٣٣٣٣٣٣٣",
            "1234567٣",
            "12\u{0}45678",
        ] {
            assert_eq!(MachineNo::parse(s), Err(InvalidMachineNo), "{s:?}");
        }
    }

    #[test]
    fn from_u32_pads_and_bounds() {
        assert_eq!(MachineNo::from_u32(0).unwrap().as_str(), "00000000");
        assert_eq!(MachineNo::from_u32(42).unwrap().as_str(), "00000042");
        assert_eq!(
            MachineNo::from_u32(99_999_999).unwrap().as_str(),
            "99999999"
        );
        assert_eq!(MachineNo::from_u32(100_000_000), None);
        assert_eq!(MachineNo::from_u32(u32::MAX), None);
    }

    #[test]
    fn ordering_is_numeric() {
        let a = MachineNo::from_u32(9).unwrap();
        let b = MachineNo::from_u32(10).unwrap();
        assert!(a < b);
    }

    #[test]
    fn serde_is_a_validated_string() {
        let m = MachineNo::parse("01234567").unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"01234567\"");
        assert_eq!(
            serde_json::from_str::<MachineNo>("\"01234567\"").unwrap(),
            m
        );
        assert!(serde_json::from_str::<MachineNo>("\"1234567\"").is_err());
        assert!(serde_json::from_str::<MachineNo>("12345678").is_err());
        // Owned strings (escapes force serde_json to allocate) work too.
        assert_eq!(
            serde_json::from_str::<MachineNo>("\"0123456\\u0037\"").unwrap(),
            m
        );
    }
}
