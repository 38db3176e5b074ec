//! Support code for the end-to-end tests lives in `tests/`; this library is empty on purpose.
