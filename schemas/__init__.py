"""Avro schemas of every Autopull topic, and the codec that reads and writes them."""

from autopull.schemas.codec import (
    AvroCodec,
    RecordSchema,
    RegistryClient,
    RegistryError,
    SchemaCatalog,
    SchemaError,
    build_record_schema,
    catalog,
    decode,
    encode,
    encode_framed,
    load_schemas,
    schema_fingerprint,
    topic_subject,
    writer_schema,
)

__all__ = [
    "AvroCodec",
    "RecordSchema",
    "RegistryClient",
    "RegistryError",
    "SchemaCatalog",
    "SchemaError",
    "build_record_schema",
    "catalog",
    "decode",
    "encode",
    "encode_framed",
    "load_schemas",
    "schema_fingerprint",
    "topic_subject",
    "writer_schema",
]
