\set aid random(1, 100000)
select :aid;
