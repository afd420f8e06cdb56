-- `pulse-exports daemon` LISTENs on pulse_export_jobs and evaluates export_jobs_sensor as soon as a job becomes
-- PENDING (inserted by any producer, or handed back to the sensor), instead of polling export_jobs every second.
-- NOTIFY is sent at commit and folds identical notifications of one transaction into one.
CREATE FUNCTION pulse_export_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('pulse_export_jobs', '');
  RETURN NULL;
END
$$;

CREATE TRIGGER export_jobs_pending_notify
  AFTER INSERT OR UPDATE OF status ON export_jobs
  FOR EACH ROW WHEN (NEW.status = 'PENDING')
  EXECUTE FUNCTION pulse_export_jobs_notify();
