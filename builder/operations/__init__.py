"""Operations over build records: ls/show, gc, release, nightly and several bakes at once (-j)."""
