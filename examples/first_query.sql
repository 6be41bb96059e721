-- A first query: a table, a role that may run scripts, and a pandas script over the
-- table's rows, run in a sandbox by airlockd.
DROP TABLE IF EXISTS measurements;
CREATE TABLE measurements (id int8 PRIMARY KEY, x float8, label text);
INSERT INTO measurements
    SELECT i, i * 0.5, 'row ' || i FROM generate_series(1, 5) AS i;

DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'analyst') THEN
        CREATE ROLE analyst;
    END IF;
END $$;
GRANT airlock_script_executor TO analyst;
GRANT SELECT ON measurements TO analyst;
SET ROLE analyst;

SELECT * FROM airlock.execute_external_script(
    language     => 'python',
    script       => $py$
print(f"the script got {len(InputDataSet)} rows; its columns: {list(InputDataSet.columns)}")
OutputDataSet = InputDataSet.assign(z = InputDataSet.x * 2)
$py$,
    input_data_1 => 'SELECT id, x, label FROM measurements ORDER BY id'
) AS r(id int8, x float8, label text, z float8);

-- The same in R.
SELECT * FROM airlock.execute_external_script(
    language     => 'R',
    script       => $r$
OutputDataSet <- transform(InputDataSet, z = x * 2)
$r$,
    input_data_1 => 'SELECT id, x, label FROM measurements ORDER BY id'
) AS r(id int8, x float8, label text, z float8);

-- Parameters, and a query from inside the script (run as analyst, in this session).
SELECT * FROM airlock.execute_external_script(
    language => 'python',
    script   => $py$
big = airlock.query("SELECT id, x FROM measurements WHERE x > $1", [threshold])
OutputDataSet = pd.DataFrame({"rows_above": [len(big)], "threshold": [threshold]})
$py$,
    params   => '{"threshold": 1.0}'
) AS r(rows_above int8, threshold float8);

RESET ROLE;
