// celeriac flower UI
