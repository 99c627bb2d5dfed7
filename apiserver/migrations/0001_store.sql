-- The store's tables: every row of every table, the revision counter, and the change feed.
-- Applied by the apiserver at start (see apiserver/src/store/postgres.rs); never edit a
-- migration that has shipped, add the next one.

CREATE TABLE shoal_meta (
    id         integer PRIMARY KEY CHECK (id = 1),
    -- The newest number issued: every commit's revision and further ids are above it.
    revision   bigint  NOT NULL,
    -- Changes up to here were removed from shoal_changes: a replica further behind reloads.
    compacted  bigint  NOT NULL
);
INSERT INTO shoal_meta (id, revision, compacted) VALUES (1, 0, 0);

CREATE TABLE shoal_kv (
    tbl        text    NOT NULL,
    key        bytea   NOT NULL,
    value      bytea   NOT NULL,
    -- The revision of the commit that wrote it.
    revision   bigint  NOT NULL,
    PRIMARY KEY (tbl, key)
);

CREATE TABLE shoal_changes (
    revision   bigint  NOT NULL,
    idx        integer NOT NULL,
    -- The store's revision after this commit (its revision plus the ids it took).
    last       bigint  NOT NULL,
    tbl        text    NOT NULL,
    key        bytea   NOT NULL,
    -- NULL: the key was removed.
    value      bytea,
    PRIMARY KEY (revision, idx)
);
